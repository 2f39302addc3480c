// The opt-in of a libvirt domain: hostd's element in the domain's
// <metadata>, as virDomainGetMetadata returns it, e.g.
//   <kvmx:hostd xmlns:kvmx="urn:kvmx:hostd:1" attach="yes"/>
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include "common/result.h"

namespace kvmx::libvirt {

// Whether the element asks hostd to attach: attach="yes" → true,
// attach="no" → false.  An error (code bad-metadata) when it is not one
// element named hostd (any prefix) or attach is missing or another value.
Result<bool> parse_opt_in(std::string_view xml);

// The decision for a domain: nullopt metadata (none) → not opted in.
// `why` gets a reason when the answer is no.
bool opts_in(const std::optional<std::string>& metadata,
             const std::string& metadata_error, std::string* why);

}  // namespace kvmx::libvirt
