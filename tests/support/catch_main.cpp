// The one Catch2 main for every test binary.
//
// Every run has a random seed, printed when a test fails ("Randomness seeded
// to: N") and settable to repeat a run: --rng-seed N, or the environment
// variable BOTTOMLESS_TEST_SEED=N (what ctest and scripts/test.sh pass on).
// Tests draw their random choices from testing::test_seed() (support/seed.h).
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>

int main(int argc, char* argv[]) {
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
    return session.run();
}
