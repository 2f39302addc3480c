// Result<T>: a value or an Error, the way hostd's functions report failure.
// No exception crosses a module boundary; callers test ok() and log the
// Error where they consume it.
#pragma once

#include <cerrno>
#include <cstring>
#include <optional>
#include <string>
#include <utility>
#include <variant>

namespace kvmx {

struct Error {
  std::string code;     // stable, machine-readable ("journal-write")
  std::string message;  // one line a user can act on, no trailing period
  int err = 0;          // errno when a system call failed, else 0
};

// Error for a failed system call: "<what>: <strerror(err)>".
inline Error sys_error(std::string code, const std::string& what,
                       int err = errno) {
  return Error{std::move(code), what + ": " + std::strerror(err), err};
}

inline Error make_error(std::string code, std::string message) {
  return Error{std::move(code), std::move(message), 0};
}

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}  // NOLINT: implicit by design
  Result(Error error) : v_(std::move(error)) {}  // NOLINT

  bool ok() const { return v_.index() == 0; }
  explicit operator bool() const { return ok(); }

  T& value() & { return std::get<0>(v_); }
  const T& value() const& { return std::get<0>(v_); }
  T&& value() && { return std::get<0>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T&& operator*() && { return std::move(*this).value(); }

  const Error& error() const { return std::get<1>(v_); }

 private:
  std::variant<T, Error> v_;
};

template <>
class [[nodiscard]] Result<void> {
 public:
  Result() = default;
  Result(Error error) : e_(std::move(error)) {}  // NOLINT

  bool ok() const { return !e_.has_value(); }
  explicit operator bool() const { return ok(); }
  const Error& error() const { return *e_; }

 private:
  std::optional<Error> e_;
};

inline Result<void> ok_result() { return {}; }

}  // namespace kvmx
