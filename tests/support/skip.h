// Skipping a test case that cannot run in this build or environment, so that
// it shows as skipped and not as passed (Catch2 v2 has no skip of its own).
//
//   if (!can_run) BOTTOMLESS_SKIP("why");   // inside a TEST_CASE: returns from it
//
// The process exits kSkipExitCode when nothing failed (catch_main.cpp), which
// ctest reports as "Skipped" (SKIP_RETURN_CODE in tests/CMakeLists.txt). Run
// directly, the binary prints "SKIPPED <test>: <why>" and exits 77 too.
#pragma once

#include <string>

#include <catch2/catch.hpp>

namespace bottomless::testing {

constexpr int kSkipExitCode = 77;
void note_skip(const std::string& test, const std::string& why);

}  // namespace bottomless::testing

#define BOTTOMLESS_SKIP(why)                                                                               \
    do {                                                                                                   \
        ::bottomless::testing::note_skip(Catch::getResultCapture().getCurrentTestName(), (why));           \
        WARN("skipped: " << (why));                                                                        \
        return;                                                                                            \
    } while (0)
