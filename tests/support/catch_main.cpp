// The one Catch2 main for every test binary.
//
// Every run has a random seed, printed when a test fails ("Randomness seeded
// to: N") and settable to repeat a run: --rng-seed N, or the environment
// variable BOTTOMLESS_TEST_SEED=N (what ctest and scripts/test.sh pass on).
// Tests draw their random choices from testing::test_seed() (support/seed.h).
//
// A test case that cannot run here calls BOTTOMLESS_SKIP (support/skip.h):
// when nothing failed, the process then exits 77, which ctest reports as
// skipped (SKIP_RETURN_CODE), not as passed.
//
// Sanitizer builds put tests/CMakeLists.txt's sqlite3 wrapper (the shell
// with the sanitizer runtime preloaded) first on PATH.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "support/skip.h"

namespace bottomless::testing {

namespace {
std::vector<std::string>& skipped() {
    static std::vector<std::string> v;
    return v;
}
}  // namespace

void note_skip(const std::string& test, const std::string& why) { skipped().push_back(test + ": " + why); }

}  // namespace bottomless::testing

int main(int argc, char* argv[]) {
#ifdef BOTTOMLESS_SHELL_DIR
    const char* path = std::getenv("PATH");
    ::setenv("PATH", (std::string(BOTTOMLESS_SHELL_DIR) + ":" + (path ? path : "/usr/bin:/bin")).c_str(), 1);
#endif
    Catch::Session session;
    if (int rc = session.applyCommandLine(argc, argv); rc != 0) return rc;
    auto& config = session.configData();
    if (config.rngSeed == 0) {  // no --rng-seed on the command line
        const char* env = std::getenv("BOTTOMLESS_TEST_SEED");
        if (env && *env) {
            char* end = nullptr;
            unsigned long v = std::strtoul(env, &end, 10);
            if (*end != '\0' || v == 0 || v > 0xffffffffUL) {
                std::fprintf(stderr, "BOTTOMLESS_TEST_SEED='%s': expected a positive 32-bit integer\n", env);
                return 2;
            }
            config.rngSeed = static_cast<unsigned>(v);
        } else {
            std::random_device rd;
            do config.rngSeed = rd();
            while (config.rngSeed == 0);
        }
    }
    const int failed = session.run();
    const auto& skips = bottomless::testing::skipped();
    if (failed != 0 || skips.empty()) return failed;
    for (const auto& s : skips) std::fprintf(stderr, "SKIPPED %s\n", s.c_str());
    return bottomless::testing::kSkipExitCode;
}
