// The seed of this test run (catch_main.cpp: random, or --rng-seed N, or
// BOTTOMLESS_TEST_SEED=N). Catch2 prints it when a test fails; tests that
// make random choices seed their generators from it, so that a failure can
// be repeated with the same choices.
#pragma once

#include <catch2/catch.hpp>

namespace bottomless::testing {

inline unsigned test_seed() { return Catch::rngSeed(); }

}  // namespace bottomless::testing
