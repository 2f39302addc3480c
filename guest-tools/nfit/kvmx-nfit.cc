// SPDX-License-Identifier: GPL-2.0-or-later
// kvmx-nfit: print a machine's NFIT as JSON and check its flush hints.
//
//   kvmx-nfit [--check] [FILE]     FILE defaults to the firmware's NFIT
#include "nfit.h"

#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <vector>

int main(int argc, char** argv)
{
    const char* path = "/sys/firmware/acpi/tables/NFIT";
    bool check = false;
    for (int i = 1; i < argc; i++) {
        if (!std::strcmp(argv[i], "--check")) {
            check = true;
        } else if (!std::strcmp(argv[i], "--help")) {
            std::puts("usage: kvmx-nfit [--check] [FILE]");
            return 0;
        } else if (argv[i][0] == '-') {
            std::fprintf(stderr, "kvmx-nfit: unknown option '%s'\n", argv[i]);
            return 2;
        } else {
            path = argv[i];
        }
    }

    std::ifstream in(path, std::ios::binary);
    if (!in) {
        std::fprintf(stderr, "kvmx-nfit: cannot open '%s': %s\n", path,
                     std::strerror(errno));
        return 1;
    }
    std::vector<uint8_t> buf{std::istreambuf_iterator<char>(in), {}};
    auto r = kvmx::nfit::parse(buf);
    if (auto* e = std::get_if<kvmx::nfit::ParseError>(&r)) {
        std::fprintf(stderr, "kvmx-nfit: '%s': %s (offset %zu)\n", path,
                     e->what.c_str(), e->offset);
        return 1;
    }
    const auto& t = std::get<kvmx::nfit::Table>(r);
    std::puts(kvmx::nfit::to_json(t).c_str());
    if (check) {
        auto bad = kvmx::nfit::check_flush_hints(t);
        for (const auto& m : bad)
            std::fprintf(stderr, "kvmx-nfit: %s\n", m.c_str());
        return bad.empty() ? 0 : 1;
    }
    return 0;
}
