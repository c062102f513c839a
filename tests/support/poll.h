// Waiting in tests for something another thread, process or the server does.
#pragma once

#include <chrono>
#include <thread>

namespace bottomless::testing {

// Polls `ready` every `every` until it holds (true) or `limit` has passed
// (false).
template <class Pred>
bool eventually(Pred ready, std::chrono::milliseconds limit,
                std::chrono::milliseconds every = std::chrono::milliseconds(1)) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    while (!ready()) {
        if (std::chrono::steady_clock::now() > deadline) return false;
        std::this_thread::sleep_for(every);
    }
    return true;
}

}  // namespace bottomless::testing
