// The shared request budget (request_budget.h): slots 1/rate apart handed out
// in the order asked for, and per-second counts for the last minute.
#include "s3/request_budget.h"

#include <algorithm>
#include <thread>

namespace bottomless::s3 {

namespace {
int64_t second_of(RequestBudget::Clock::time_point t) {
    return std::chrono::duration_cast<std::chrono::seconds>(t.time_since_epoch()).count();
}
}  // namespace

void RequestBudget::set_rate(double per_second) {
    if (!(per_second > 0)) per_second = 0;
    std::lock_guard lock(mu_);
    if (per_second == rate_) return;
    rate_ = per_second;
    // Slots reserved at the old rate stay theirs; the next one is due no
    // later than one new interval from now.
    if (rate_ > 0) {
        const auto interval = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(1.0 / rate_));
        next_ = std::min(next_, Clock::now() + interval);
    }
}

double RequestBudget::rate() const {
    std::lock_guard lock(mu_);
    return rate_;
}

RequestBudget::Clock::duration RequestBudget::take() {
    Clock::time_point slot;
    Clock::duration wait{};
    {
        std::lock_guard lock(mu_);
        const auto now = Clock::now();
        slot = now;
        if (rate_ > 0) {
            slot = std::max(now, next_);
            next_ = slot + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(1.0 / rate_));
            wait = slot - now;
        }
        ++requests_;
        if (wait > Clock::duration::zero()) {
            ++waited_;
            wait_total_ += wait;
            wait_max_ = std::max(wait_max_, wait);
        }
        // Counted in the second the request goes out.
        Second& s = ring_[static_cast<size_t>(second_of(slot)) % kSeconds];
        if (s.second != second_of(slot)) s = Second{second_of(slot), 0, {}};
        ++s.requests;
        s.waited += wait;
    }
    if (wait > Clock::duration::zero()) std::this_thread::sleep_until(slot);
    return wait;
}

RequestBudget::Stats RequestBudget::stats() const {
    std::lock_guard lock(mu_);
    Stats st;
    st.rate = rate_;
    st.requests = requests_;
    st.waited = waited_;
    st.wait_total = wait_total_;
    st.wait_max = wait_max_;
    // The last 60 whole seconds and the current one, and slots already
    // reserved in the seconds ahead.
    const int64_t now = second_of(Clock::now());
    for (const Second& s : ring_)
        if (s.second > now - 60 && s.second >= 0) {
            st.requests_last_minute += s.requests;
            st.wait_last_minute += s.waited;
        }
    return st;
}

}  // namespace bottomless::s3
