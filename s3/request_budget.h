// A request budget shared by several S3 clients: at most `rate` requests a
// second in all, whatever the number of clients drawing from it. The
// replicator gives every database of a process the same one
// (max_requests_per_second from the environment), so a fleet of databases has
// a request rate, and a bill, set by configuration, not by its size.
//
// Pacing, not bursts: requests are spaced 1/rate apart, so in any window of W
// seconds at most rate × W + 1 go out. Turns are handed out in the order they
// are asked for (each take() reserves the next free slot), so clients that
// compete alternate instead of one of them draining the budget: a database
// shipping a backlog asks for one request at a time, like every other.
//
// Every request is counted, capped or not (rate 0: unlimited), for the
// process's requests-per-minute figure.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <mutex>

namespace bottomless::s3 {

class RequestBudget {
public:
    using Clock = std::chrono::steady_clock;

    // Requests a second for all clients together; 0 (or less): unlimited.
    // A change applies to the requests that ask after it.
    void set_rate(double per_second);
    double rate() const;

    // Waits for this request's turn (returns at once when unlimited or when
    // the budget has room); returns how long it waited. Takes a mutex for a
    // moment, never while sleeping.
    Clock::duration take();

    struct Stats {
        double rate = 0;                  // 0: unlimited
        uint64_t requests = 0;            // take() calls since the budget was made
        uint64_t requests_last_minute = 0;  // of them, sent in the last 60 s (or about to be)
        uint64_t waited = 0;              // requests that had to wait for their turn
        Clock::duration wait_total{};     // the sum of their waits
        Clock::duration wait_max{};       // the longest
        Clock::duration wait_last_minute{};  // waits of requests sent in the last 60 s
    };
    Stats stats() const;

private:
    static constexpr size_t kSeconds = 64;  // ring of per-second counts, a minute and some
    struct Second {
        int64_t second = -1;  // Clock seconds this slot counts, -1: unused
        uint64_t requests = 0;
        Clock::duration waited{};
    };

    mutable std::mutex mu_;  // guards everything below
    double rate_ = 0;
    Clock::time_point next_{};  // the earliest time the next request may go
    uint64_t requests_ = 0, waited_ = 0;
    Clock::duration wait_total_{}, wait_max_{};
    std::array<Second, kSeconds> ring_{};
};

}  // namespace bottomless::s3
