// Read replicas: the follower thread (polls, back-off, generation
// listings) and the apply of a segment. See replica.h, docs/SEMANTICS.md
// "Read replicas".
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <vector>

#include "replicator/bucket.h"
#include "replicator/replica_internal.h"
#include "replicator/util.h"
#include "s3/log.h"

namespace bottomless::replicator {

using namespace replica_detail;

namespace {

// Listing the generations (how a new one is found: a snapshot on the
// writer, its restart, a restore elsewhere) costs LISTs; the next segment's
// GET costs one request whether or not it is there. So the follower lists
// only once it has found nothing new for a *time* (not a count of polls: at
// a short poll every gap between the writer's batches is many misses),
// kListAfter(poll) = max(3 polls, 5 s), then again after twice that gap,
// and so on up to kListAtMost(poll) = max(30 polls, 30 s); a new segment
// starts the schedule over. A new generation is thus found within
// kListAfter of the writer's last segment in the old one, and within
// kListAtMost (plus a poll and the listing) in any case.
std::chrono::milliseconds list_after(std::chrono::milliseconds poll) {
    return std::max<std::chrono::milliseconds>(poll * 3, std::chrono::seconds(5));
}
std::chrono::milliseconds list_at_most(std::chrono::milliseconds poll) {
    return std::max<std::chrono::milliseconds>(poll * 30, std::chrono::seconds(30));
}
// A step that failed (S3 refused or unreachable, an apply or a hydration
// that failed) is tried again after a back-off, not at the next poll: the
// n-th failure in a row waits kRetryFirst x 2^(n-1), at least a poll, at
// most max(kRetryMost, poll); a step that works resets it. So a refusal the
// client does not retry (403) costs ~10 requests a minute, not one a poll,
// and a hydration that keeps failing is not a download per poll.
constexpr std::chrono::milliseconds kRetryFirst{100};
constexpr std::chrono::milliseconds kRetryMost{5000};
std::chrono::milliseconds retry_backoff(uint64_t failures, std::chrono::milliseconds poll) {
    const auto most = std::max(kRetryMost, poll);
    auto wait = kRetryFirst;
    for (uint64_t i = 1; i < failures && wait < most; ++i) wait *= 2;
    return std::clamp(wait, std::min(poll, most), most);
}

}  // namespace

// ---- following ----

void Replica::run() {
    std::unique_lock lock(mu_);
    while (!stop_) {
        lock.unlock();
        Step r = Step::Failed;
        // Nothing may escape the thread (std::terminate would end the host).
        try {
            r = step();
        } catch (const std::exception& e) {
            set_error(std::string("follower step failed: ") + e.what());
        } catch (...) {
            set_error("follower step failed: unknown exception");
        }
        lock.lock();
        if (r == Step::Failed) {
            ++consecutive_failures_;
            retry_backoff_ = retry_backoff(consecutive_failures_, cfg_.replica_poll);
        } else {
            consecutive_failures_ = 0;
            retry_backoff_ = std::chrono::milliseconds(0);
        }
        if (r != Step::Progress)
            cv_.wait_for(lock, r == Step::Failed ? retry_backoff_ : cfg_.replica_poll, [&] { return stop_; });
    }
}

bool Replica::try_lead() {
    // The follower process went away: one of the readers takes over.
    auto l = LeaderLock::acquire(path_, std::chrono::milliseconds(0));
    if (!l || !l->leader()) return false;
    lock_.emplace(std::move(l).value());
    // Status says "follower" only once the file is recovered: a reader here
    // that waits for the role must not meet the dead follower's hot journal
    // (its read would fail: a read-only connection cannot roll it back).
    auto lead = [&] {
        std::lock_guard lock(mu_);
        leader_ = true;
    };
    auto saved = load_replica_state(path_);
    if (!file_->is_open())
        if (auto o = file_->open(path_); !o) {
            set_error(o.error().message);
            lead();  // the next steps retry as the follower
            return false;
        }
    if (auto r = recover_journal(); !r) {
        set_error(r.error().message);
        saved.reset();
    }
    if (saved && proven(*saved)) {
        std::lock_guard lock(mu_);
        state_ = *saved;
    } else if (auto h = hydrate("took over following from a process that left, its state not proven"); !h) {
        set_error(h.error().message);
    }
    lead();
    lock_->startup_done();
    return true;
}

Replica::Step Replica::step() {
    bool leader, broken;
    ReplicaState s;
    {
        std::lock_guard lock(mu_);
        ++polls_;
        leader = leader_;
        broken = broken_;
        s = state_;
    }
    if (!leader) return try_lead() ? Step::Progress : Step::Idle;
    if (!cipher_ && !cfg_.encryption.empty()) {  // S3 was unreachable at the open
        auto c = open_cipher(*client_, cfg_.bucket, cfg_.db_id, cfg_.encryption, /*create=*/false);
        if (!c) {
            set_error(c.error().message);
            return Step::Failed;
        }
        cipher_ = *c;
    }
    if (s.applying) {  // an earlier apply failed half-way: the file is not trusted
        if (auto h = hydrate("an apply failed half-way"); !h) {
            set_error(h.error().message);
            return Step::Failed;
        }
        return Step::Progress;
    }
    if (!broken) {
        const uint64_t seq = s.seq + 1;
        const std::string key = segment_key(cfg_.db_id, s.generation, seq);
        // The next key is predictable: one GET finds it or answers 404.
        auto body = client_->get_object(cfg_.bucket, key, std::nullopt, nullptr, max_segment_object_size());
        if (body) {
            if (auto a = apply_segment(seq, key, *body); !a) {
                set_error(a.error().message);
                return Step::Failed;
            }
            std::lock_guard lock(mu_);
            last_error_.clear();
            follow_error_.clear();
            stalled_ = false;
            miss_since_ = {};
            return Step::Progress;
        }
        if (body.error().kind != ErrorKind::NotFound) {
            set_error("polling " + key + ": " + body.error().message);
            return Step::Failed;
        }
    }
    bool list = false;
    {
        std::lock_guard lock(mu_);
        const auto now = Clock::now();
        if (miss_since_ == Clock::time_point{}) {  // the streak starts (right after the last segment)
            miss_since_ = now;
            list_gap_ = list_after(cfg_.replica_poll);
            next_list_ = now + list_gap_;
        }
        if (now >= next_list_) {
            list = true;
            list_gap_ = std::min(list_gap_ * 2, list_at_most(cfg_.replica_poll));
            next_list_ = now + list_gap_;
            ++listings_;
        }
        // Nothing newer in the generation: caught up as of now, unless the
        // last listing found that this generation cannot go on (then the
        // lag grows and the verdict stays in last_error).
        if (!broken && !stalled_) {
            caught_up_us_ = now_us();
            last_error_.clear();
        }
    }
    if (list) {
        Status c = check_generations();
        std::lock_guard lock(mu_);
        if (c) {
            follow_error_.clear();
            stalled_ = false;
        } else {
            if (c.error().message != follow_error_ && !closing_.load())
                log::warn("replica " + path_ + ": " + c.error().message);
            follow_error_ = c.error().message;
            stalled_ = stalled_code(c.error().code);
        }
    }
    return Step::Idle;  // a failed listing keeps its own schedule (list_gap_)
}

Status Replica::apply_segment(uint64_t seq, const std::string& key, const std::string& body) {
    ReplicaState s;
    {
        std::lock_guard lock(mu_);
        s = state_;
    }
    // First pass: the whole object is checked (trailer, key, chain, every
    // frame decodes) before one byte of the file changes.
    SegmentHeader h;
    auto on_header = [&](const SegmentHeader& sh) -> Status {
        if (sh.db_id != cfg_.db_id || sh.generation != s.generation || sh.seq != seq)
            return make_error(ErrorKind::Corrupt, key + " holds another object (" + sh.db_id + "/" + sh.generation + "/" +
                                                      std::to_string(sh.seq) + ")",
                              "WrongObject");
        if (sh.prev_sha256 != s.last_sha256 || !(sh.start == s.position) || sh.page_size != s.page_size)
            return make_error(ErrorKind::Corrupt,
                              key + " does not continue the replica's position (chain broken: a fork, or an object "
                                    "replaced); not applied, waiting for a new generation",
                              "ChainBroken");
        h = sh;
        return {};
    };
    std::vector<uint32_t> pgnos{1};  // page 1 always changes (its counters)
    auto sha = for_each_segment_frame(body, key, cipher_.get(), on_header,
                                      [&](uint64_t, uint32_t pgno, std::string_view) {
                                          pgnos.push_back(pgno);
                                          return Status{};
                                      });
    if (!sha) {
        if (sha.error().kind == ErrorKind::Corrupt) {
            std::lock_guard lock(mu_);
            broken_ = true;
        }
        return std::move(sha).error();
    }
    if (h.txns.empty()) {
        std::lock_guard lock(mu_);
        broken_ = true;  // the same object would be fetched again at every poll
        return make_error(ErrorKind::Corrupt, key + " holds no transaction; not applied, waiting for a new generation",
                          "CorruptObject");
    }
    const uint32_t db_pages = h.txns.back().db_pages;

    if (auto l = lock_exclusive(*file_); !l) return l;
    // A hot journal (an earlier apply that failed and could not be rolled
    // back) goes first: journaling a torn page would make it the "original".
    bool rolled = false;
    Status w = rollback_journal_locked(&rolled);
    if (w && rolled) {
        file_->unlock(SQLITE_LOCK_NONE);
        std::lock_guard lock(mu_);
        state_.applying = true;  // rolled back to a state the position may not describe: hydrate
        return make_error(ErrorKind::Io, "rolled back an unfinished apply's journal; hydrating", "JournalRolledBack");
    }
    ReplicaState mark = s;
    mark.applying = true;
    if (w) w = save_state(mark, true);
    // The original of every page this apply overwrites or cuts off, durable
    // before the first write.
    const int64_t cur_size = file_->size();
    if (w && cur_size < 0) w = file_->check(SQLITE_IOERR_FSTAT, "size");  // never journal "0 pages" as the original
    const uint32_t orig_pages = cur_size > 0 ? static_cast<uint32_t>(cur_size / s.page_size) : 0;
    for (uint32_t p = db_pages + 1; p <= orig_pages; ++p) pgnos.push_back(p);
    std::sort(pgnos.begin(), pgnos.end());
    pgnos.erase(std::unique(pgnos.begin(), pgnos.end()), pgnos.end());
    bool journaled = false;
    if (w) w = write_journal(pgnos, orig_pages, s.page_size);
    journaled = static_cast<bool>(w);
    // Second pass: the pages, in order (a later frame of a page wins).
    if (w) {
        long written = 0;
        auto again = for_each_segment_frame(body, key, cipher_.get(), [](const SegmentHeader&) { return Status{}; },
                                            [&](uint64_t, uint32_t pgno, std::string_view page) {
                                                Status pw = file_->write(page.data(), static_cast<int>(page.size()),
                                                                         static_cast<int64_t>(pgno - 1) * s.page_size);
                                                if (++written == exit_after_pages()) ::_exit(3);
                                                return pw;
                                            });
        if (!again) w = std::move(again).error();
    }
    if (w && file_->size() > static_cast<int64_t>(uint64_t{db_pages} * s.page_size))
        w = file_->truncate(static_cast<int64_t>(uint64_t{db_pages} * s.page_size));
    ReplicaState next = s;
    next.counter = s.counter + 1;
    if (w) {
        unsigned char hdr[kHeader] = {};
        w = file_->read(hdr, sizeof hdr, 0);
        make_legacy_header(hdr, next.counter, db_pages);
        if (w) w = file_->write(hdr, sizeof hdr, 0);
    }
    if (w) w = file_->sync();
    next.seq = seq;
    next.position = h.end;
    next.last_sha256 = *sha;
    next.db_pages = db_pages;
    next.last_commit_us = h.txns.back().commit_us;
    next.applying = false;
    // The state (and status) moves before readers can see the new pages;
    // deleting the journal is the commit point.
    if (w) w = save_state(next, false);
    if (w && ::unlink((path_ + "-journal").c_str()) != 0)
        w = make_error(ErrorKind::Io, "cannot delete the journal " + path_ + "-journal: " + errno_text(errno),
                       "WriteFailed");
    if (!w) {
        // Put the original pages back while we still hold the lock; if that
        // fails too the journal stays hot (readers refuse to read the file)
        // and the next step hydrates.
        bool back = false;
        Status rb = journaled ? rollback_journal_locked(&back) : Status{};
        file_->unlock(SQLITE_LOCK_NONE);
        if (!rb) log::warn("replica " + path_ + ": cannot roll back a failed apply: " + rb.error().message);
        std::lock_guard lock(mu_);
        state_.applying = true;  // the next step hydrates
        return w;
    }
    {
        std::lock_guard lock(mu_);
        ++segments_applied_;
        last_apply_us_ = now_us();
        applied_lag_us_ = next.last_commit_us > 0 ? last_apply_us_ - next.last_commit_us : 0;
    }
    file_->unlock(SQLITE_LOCK_NONE);
    return {};
}

// A listing of the generations (after a streak of misses): a newer one than
// the replica's is followed by re-hydrating in place: when it descends from
// the replica's position, from the replica's own pages and the new
// snapshot's page index (only the frames that differ are fetched; a
// format-1 snapshot in full); whether it descends is reported. Its cost
// does not grow with the generation's length: one LIST of the generation
// ids, one LIST of at most one key after the next segment's, and a
// description (a LIST of its objects) only of generations newer than the
// replica's. Errors whose code is in stalled_codes() are verdicts (the
// replica cannot go on from where it is), the others transient.
bool Replica::stalled_code(const std::string& code) {
    return code == "ReplicaAhead" || code == "GenerationRemoved" || code == "SegmentMissing";
}

Status Replica::check_generations() {
    auto gens = list_generations(*client_, cfg_.bucket, cfg_.db_id);
    if (!gens) return std::move(gens).error();
    ReplicaState s;
    {
        std::lock_guard lock(mu_);
        s = state_;
    }
    const int64_t own_ms = generation_time_ms(s.generation);
    bool own_listed = false;
    const GenerationInfo* latest = nullptr;
    // Newest first: describe the generations newer than the replica's until
    // one has a snapshot (the one a restore would choose).
    for (auto& g : *gens) {
        if (g.id == s.generation) {
            own_listed = true;
            break;
        }
        if (own_ms >= 0 && g.created_ms < own_ms) break;  // older than the replica's
        if (auto st = describe_generation(*client_, cfg_.bucket, cfg_.db_id, g); !st) return st;
        if (g.has_snapshot) {
            latest = &g;
            break;
        }
    }
    const std::string where = "s3://" + cfg_.bucket + "/" + cfg_.db_id;
    const std::string serving = "; the replica keeps its last applied state (generation " + s.generation + ", segment " +
                                std::to_string(s.seq) + ") until the writer starts a new generation";
    if (!latest && !own_listed) {
        std::string older;
        for (const auto& g : *gens)
            if (own_ms < 0 || g.created_ms < own_ms) {
                older = g.id;
                break;
            }
        return make_error(ErrorKind::Precondition,
                          "the replica's generation " + s.generation + " is no longer in " + where +
                              " (removed, e.g. with bottomless-cli rm)" +
                              (older.empty() ? std::string() : "; older generations (" + older + ") are not followed") +
                              serving,
                          "GenerationRemoved");
    }
    if (!latest) {
        // The replica's generation is the newest: is it stuck on a segment
        // that will never come (removed, lost) while later ones exist?
        s3::ListRequest req;
        req.prefix = generation_prefix(cfg_.db_id, s.generation) + "seg-";
        req.start_after = segment_key(cfg_.db_id, s.generation, s.seq + 1);
        req.max_keys = 1;
        auto page = client_->list_objects_page(cfg_.bucket, req);
        if (!page) return std::move(page).error();
        uint64_t later = 0;
        for (const auto& o : page->objects)
            if (parse_segment_key(o.key, later) && later > s.seq + 1) {
                // Not a race with an upload in flight: the streak lasted seconds.
                auto again = client_->head_object(cfg_.bucket, segment_key(cfg_.db_id, s.generation, s.seq + 1));
                if (again) return {};  // it arrived meanwhile: the next poll takes it
                return make_error(ErrorKind::Precondition,
                                  "segment " + std::to_string(s.seq + 1) + " of generation " + s.generation +
                                      " is missing from " + where + " while segment " + std::to_string(later) +
                                      " exists (removed, e.g. with bottomless-cli rm, or lost): the chain cannot go on" +
                                      serving,
                                  "SegmentMissing");
            }
        return {};
    }
    std::string lineage = "a new generation " + latest->id;
    auto snap = read_snapshot_header(*client_, cfg_.bucket, snapshot_key(cfg_.db_id, latest->id), latest->snapshot_bytes);
    bool descends = false;  // only then can the image start from the replica's pages
    if (snap) {
        descends = snap->parent_generation == s.generation && snap->parent_seq >= s.seq;
        if (descends)
            lineage += " continues the replica's generation (from its segment " + std::to_string(snap->parent_seq) + ")";
        else
            lineage += " does not descend from the replica's position (parent " +
                       (snap->parent_generation.empty() ? std::string("none") : snap->parent_generation) + " at segment " +
                       std::to_string(snap->parent_seq) + "): the history diverged (a restore elsewhere?)";
    }
    return hydrate(lineage, latest->id, /*from_file=*/descends);
}

}  // namespace bottomless::replicator
