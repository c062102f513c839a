// The replicator core. See replicator.h for the contract, docs/SEMANTICS.md
// for the guarantees and docs/FORMAT.md for what lands in the bucket.
#include "replicator/replicator.h"
#include "replicator/metrics.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <map>
#include <stdexcept>
#include <unordered_map>

#include "replicator/restore.h"
#include "replicator/state_file.h"
#include "s3/log.h"

namespace bottomless::replicator {

struct RecoveredTxn {
    std::vector<SegmentFrame> frames;
    uint32_t db_pages = 0;
    WalPosition end;
    uint64_t bytes = 0;
};

struct LocalProof {
    bool proven = false;
    uint32_t page_size = 0;          // from the WAL header (0: no WAL)
    uint32_t salt1 = 0, salt2 = 0;   // the WAL's epoch
    uint64_t last_commit_frame = 0;  // committed frames of that epoch
    uint64_t unshipped_from = 0;     // frames of that epoch after this one are not in the bucket
    // Committed frames of the recorded epoch that a WAL restart left in the
    // file (they were staged in memory when the process died): shipped first.
    std::vector<RecoveredTxn> recovered;
};

namespace {

using Clock = std::chrono::steady_clock;

int64_t now_us() {
    return std::chrono::duration_cast<std::chrono::microseconds>(
               std::chrono::system_clock::now().time_since_epoch())
        .count();
}


struct Fd {
    int fd = -1;
    Fd() = default;
    explicit Fd(int f) : fd(f) {}
    Fd(const Fd&) = delete;
    Fd& operator=(const Fd&) = delete;
    ~Fd() {
        if (fd >= 0) ::close(fd);
    }
};

bool pread_full(int fd, void* buf, size_t n, uint64_t off) {
    auto* p = static_cast<char*>(buf);
    size_t got = 0;
    while (got < n) {
        ssize_t r = ::pread(fd, p + got, n - got, static_cast<off_t>(off + got));
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return false;
        got += static_cast<size_t>(r);
    }
    return true;
}

}  // namespace

// The WAL file, opened when first needed: frames the tee lacks are read
// from it (the uploader's fallback, counted in status as wal_frames_read).
class WalFile {
public:
    explicit WalFile(const std::string& path) : path_(path) {}
    int fd() {
        if (!opened_) {
            opened_ = true;
            fd_.fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
        }
        return fd_.fd;
    }
    std::optional<WalHeader> header() {
        unsigned char h[kWalHeaderSize];
        if (fd() < 0 || !pread_full(fd_.fd, h, sizeof h, 0)) return std::nullopt;
        return parse_wal_header(h);
    }
    bool read(uint32_t page_size, uint64_t from, uint64_t to, std::vector<TeeFrame>& out) {
        if (fd() < 0) return false;
        for (uint64_t i = from; i <= to; ++i) {
            TeeFrame f;
            f.page.resize(page_size);
            const uint64_t off = wal_frame_offset(page_size, i);
            if (!pread_full(fd_.fd, f.header, sizeof f.header, off) ||
                !pread_full(fd_.fd, f.page.data(), page_size, off + kWalFrameHeaderSize))
                return false;
            out.push_back(std::move(f));
        }
        return true;
    }

private:
    std::string path_;
    Fd fd_;
    bool opened_ = false;
};

namespace {

// How long an open waits for another process's start-up (which may be a
// restore of a large database) before it gives up with SQLITE_BUSY.
constexpr std::chrono::seconds kStartupWait{120};

// The registry of replicators by canonical path. Its lock is held only to
// look up or change an entry, never across I/O or a thread join: a
// database's start-up (S3 requests, a restore) and shutdown (the final
// flush) run outside it, so opening or closing one database never waits for
// another. An entry is "opening" while its start-up runs, and stays, expired,
// while a closed replicator's final flush runs; an acquire() of the same path
// waits for either to finish (registry_cv).
struct RegistryEntry {
    std::weak_ptr<Replicator> replicator;
    bool opening = false;
};
std::mutex& registry_mu() {
    static auto* mu = new std::mutex();
    return *mu;
}
std::condition_variable& registry_cv() {
    static auto* cv = new std::condition_variable();
    return *cv;
}
std::map<std::string, RegistryEntry>& registry() {
    static auto* m = new std::map<std::string, RegistryEntry>();
    return *m;
}

bool stat_file(const std::string& path, struct stat& st) { return ::stat(path.c_str(), &st) == 0; }

int64_t mtime_ns(const struct stat& st) {
    return static_cast<int64_t>(st.st_mtim.tv_sec) * 1'000'000'000 + st.st_mtim.tv_nsec;
}

std::string fmt_time_us(int64_t us) {
    if (us <= 0) return "unknown";
    std::time_t t = static_cast<std::time_t>(us / 1'000'000);
    std::tm tm{};
    gmtime_r(&t, &tm);
    char buf[40];
    std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", &tm);
    char out[64];
    std::snprintf(out, sizeof out, "%s.%06lldZ", buf, static_cast<long long>(us % 1'000'000));
    return out;
}

// Whether the local files are exactly where `state`'s history ends: the WAL
// still in the recorded epoch, its frame at the recorded position a commit
// with the recorded checksums; or one restart later, with the frames the
// recorded epoch still had unshipped recovered from the file (below); or,
// after a clean close, no WAL and a database file untouched since (size,
// mtime, inode). Local reads only.
// The recorded epoch's frames after `at`, up to `to`, read back from their
// slots as SQLite's own recovery would judge them: its salts, the checksum
// chain continuing from `at`, and a commit frame last. False when any is
// missing or overwritten (the new epoch has written that far).
bool recover_old_epoch(const std::string& wal_path, const WalHeader& current, const WalPosition& at, uint64_t to,
                       std::vector<RecoveredTxn>& out) {
    Fd fd(::open(wal_path.c_str(), O_RDONLY | O_CLOEXEC));
    if (fd.fd < 0) return false;
    WalHeader old = current;  // same byte order and page size (a page size change leaves WAL mode)
    old.salt1 = at.salt1;
    old.salt2 = at.salt2;
    const uint32_t psz = current.page_size;
    std::vector<unsigned char> buf(kWalFrameHeaderSize + psz);
    uint32_t s1 = at.cksum1, s2 = at.cksum2;
    RecoveredTxn cur;
    for (uint64_t i = at.frame + 1; i <= to; ++i) {
        if (!pread_full(fd.fd, buf.data(), buf.size(), wal_frame_offset(psz, i))) return false;
        if (!verify_frame(old, buf.data(), buf.data() + kWalFrameHeaderSize, s1, s2)) return false;
        WalFrameHeader fh = parse_frame_header(buf.data());
        cur.frames.push_back(
            SegmentFrame{fh.pgno, std::string(reinterpret_cast<const char*>(buf.data() + kWalFrameHeaderSize), psz)});
        cur.bytes += psz;
        if (fh.is_commit()) {
            cur.db_pages = fh.db_size;
            cur.end = WalPosition{at.salt1, at.salt2, i, s1, s2};
            out.push_back(std::move(cur));
            cur = RecoveredTxn{};
        }
    }
    return cur.frames.empty();
}

LocalProof prove_local(const LocalState& state, const std::string& db_path, const std::string& wal_path) {
    LocalProof proof;
    auto scan = scan_wal_file(wal_path);
    if (!scan) return proof;
    const WalPosition& at = state.position;
    if (scan->has_header && scan->header.salt1 == at.salt1 && scan->header.salt2 == at.salt2 &&
        at.frame <= scan->last_commit_frame) {
        if (at.frame == 0) {
            proof.proven = scan->header.cksum1 == at.cksum1 && scan->header.cksum2 == at.cksum2;
        } else {
            Fd fd(::open(wal_path.c_str(), O_RDONLY | O_CLOEXEC));
            unsigned char fh[kWalFrameHeaderSize];
            if (fd.fd >= 0 && pread_full(fd.fd, fh, sizeof fh, wal_frame_offset(scan->header.page_size, at.frame))) {
                auto h = parse_frame_header(fh);
                proof.proven = h.cksum1 == at.cksum1 && h.cksum2 == at.cksum2 && h.is_commit();
            }
        }
        proof.unshipped_from = at.frame;
    } else if (scan->has_header && scan->header.salt1 == at.salt1 + 1u) {
        // Exactly one restart since the recorded position: SQLite adds one to
        // salt1 at each restart (a new WAL file gets random salts). A restart
        // while frames were unshipped records how far that epoch went first
        // (`restarted`); without a record, everything was durable then.
        const WalPosition& r = state.restarted;
        if (r.frame > at.frame && r.salt1 == at.salt1 && r.salt2 == at.salt2)
            proof.proven = recover_old_epoch(wal_path, scan->header, at, r.frame, proof.recovered);
        else
            proof.proven = true;
        proof.unshipped_from = 0;
    } else if (!scan->has_header && state.clean_close) {
        struct stat db{};
        proof.proven = ::stat(db_path.c_str(), &db) == 0 && state.db_size == db.st_size &&
                       state.db_mtime_ns == mtime_ns(db) && state.db_ino == db.st_ino;
    }
    if (proof.proven && scan->has_header) {
        proof.page_size = scan->header.page_size;
        proof.salt1 = scan->header.salt1;
        proof.salt2 = scan->header.salt2;
        proof.last_commit_frame = scan->last_commit_frame;
    }
    return proof;
}

// The newest of `gens` (newest first) that has a snapshot: "the bucket's"
// generation for every start-up decision. Describes generations on the way.
Status find_latest(s3::Client& client, const std::string& bucket, const std::string& db_id,
                   std::vector<GenerationInfo>& gens, const GenerationInfo*& latest) {
    latest = nullptr;
    for (auto& g : gens) {
        if (auto st = describe_generation(client, bucket, db_id, g); !st) return st;
        if (g.has_snapshot) {
            latest = &g;
            return {};
        }
    }
    return {};
}

uint32_t db_header_page_size(const unsigned char* h) {
    uint32_t v = (static_cast<uint32_t>(h[16]) << 8) | h[17];
    return v == 1 ? 65536 : v;
}

}  // namespace

// ---------------------------------------------------------------------------
// Construction, start-up decision, shutdown

Replicator::Replicator(std::string path, ReplicatorConfig config)
    : path_(std::move(path)), wal_path_(path_ + "-wal"), state_path_(path_ + "-bottomless"),
      config_(std::move(config)), tee_(config_.max_pending_bytes) {
    s3::ClientConfig c = config_.s3;
    // A sync commit must not outlive its timeout inside the client's retries.
    if (config_.sync) c.retry.max_elapsed = std::min(c.retry.max_elapsed, config_.sync_timeout);
    // Async: give up on one attempt early and retry from the uploader loop, so
    // status shows the outage and new commits join the next batch.
    else c.retry.max_elapsed = std::min<std::chrono::milliseconds>(
        c.retry.max_elapsed, std::max<std::chrono::milliseconds>(std::chrono::seconds(5), config_.batch_interval * 5));
    client_ = std::make_unique<s3::Client>(std::move(c));
    last_snapshot_time_ = Clock::now();
}

std::shared_ptr<Replicator> Replicator::find(const std::string& path) {
    std::lock_guard lock(registry_mu());
    auto it = registry().find(path);
    return it == registry().end() ? nullptr : it->second.replicator.lock();
}

Result<std::shared_ptr<Replicator>> Replicator::acquire(const std::string& path, const ReplicatorConfig& config,
                                                       long* leader_elsewhere) {
    {
        std::unique_lock lock(registry_mu());
        for (;;) {
            auto it = registry().find(path);
            if (it == registry().end()) break;
            if (!it->second.opening) {
                if (auto r = it->second.replicator.lock()) {
                    lock.unlock();
                    // Another key must not pass unnoticed just because the database
                    // is already open: that open would believe its key is right.
                    if (r->config_.encryption.kind() != config.encryption.kind() ||
                        r->config_.encryption.material() != config.encryption.material())
                        return make_error(ErrorKind::InvalidArgument,
                                          "database " + path + " is already open in this process with " +
                                              (r->cipher_ ? "encryption key id " + r->cipher_->key_id()
                                                          : "no encryption") +
                                              "; this open gives " +
                                              (config.encryption.empty() ? "no key" : "another key or passphrase"),
                                          "EncryptionMismatch");
                    if (r->config_.bucket != config.bucket || r->config_.db_id != config.db_id)
                        log::warn("database " + path + " is already replicated to bucket '" + r->config_.bucket +
                                  "' as '" + r->config_.db_id + "'; the settings of this open are ignored");
                    return r;
                }
            }
            // Starting up, or closing (its final flush): wait for it.
            registry_cv().wait(lock);
        }
        registry()[path] = RegistryEntry{{}, true};
    }
    // From here this thread owns the path's start-up; the marker goes on
    // every way out (a failure, a follower, an exception).
    std::shared_ptr<Replicator> started;
    struct Marker {
        const std::string& path;
        std::shared_ptr<Replicator>& started;
        ~Marker() {
            {
                std::lock_guard lock(registry_mu());
                if (started) registry()[path] = RegistryEntry{started, false};
                else registry().erase(path);
            }
            registry_cv().notify_all();
        }
    } marker{path, started};

    // Before anything touches the bucket or the state file: is another
    // process replicating this database? Two replicating processes would
    // each ship to a generation of their own and the newest would lack the
    // other's commits (a fork, and a lost commit at restore).
    auto election = LeaderLock::acquire(path, kStartupWait);
    if (!election) return std::move(election).error();
    if (!election->leader()) {
        if (leader_elsewhere) *leader_elsewhere = election->leader_pid() > 0 ? election->leader_pid() : -1;
        return std::shared_ptr<Replicator>();
    }
    std::shared_ptr<Replicator> r(new Replicator(path, config));
    r->leader_lock_.emplace(std::move(election).value());
    if (auto st = r->startup(); !st) return std::move(st).error();
    r->leader_lock_->startup_done();
    r->registered_ = true;
    started = r;
    return r;
}

bool Replicator::start_offline() {
    // initial_replication=force asks for a decision against the bucket; a
    // restored file's note starts a new history (both need the bucket).
    if (config_.initial_replication == InitialReplication::Force) return false;
    auto state = read_state_file(state_path_);
    if (!state || state->restored || state->generation.empty() || state->bucket != config_.bucket ||
        state->db_id != config_.db_id)
        return false;
    // The key must provably be the generation's: its id, derived locally
    // (a passphrase from the KDF parameters the state file recorded).
    std::shared_ptr<const Cipher> cipher;
    if (config_.encryption.kind() == EncryptionSecret::Kind::Key) {
        cipher = Cipher::from_key(config_.encryption.material());
    } else if (config_.encryption.kind() == EncryptionSecret::Kind::Passphrase) {
        if (state->kdf.empty()) return false;
        auto kdf = parse_kdf(state->kdf, state_path_);
        if (!kdf) return false;
        auto c = Cipher::from_passphrase(config_.encryption.material(), *kdf);
        if (!c) return false;
        cipher = std::move(c).value();
    }
    if ((cipher ? cipher->key_id() : std::string()) != state->key_id) return false;
    LocalProof proof = prove_local(*state, path_, wal_path_);
    if (!proof.proven) return false;

    cipher_ = std::move(cipher);
    kdf_text_ = state->kdf;
    lineage_ = state->lineage;
    continue_from(*state, proof);
    // Until the uploader has seen the bucket agree, nothing is uploaded.
    deferred_check_ = true;
    log::info("continuing generation " + generation_ + " at segment " + std::to_string(seq_) +
              " without asking S3 (the local files prove it); the bucket is checked before the first upload");
    return true;
}

void Replicator::continue_from(const LocalState& state, LocalProof& proof) {
    generation_ = state.generation;
    seq_ = state.seq;
    prev_sha256_ = state.prev_sha256;
    captured_ = state.position;
    if (proof.page_size) page_size_ = proof.page_size;
    mark_durable(state.position, 0);
    if (!proof.recovered.empty()) {
        // Frames the recorded epoch still had unshipped when the WAL
        // restarted and the process died: read back from the WAL file,
        // shipped before the new epoch's. (Commit times: now, the moment
        // bottomless observes them, as for any commit.)
        restarted_ = state.restarted;
        const int64_t t = now_us();
        uint64_t bytes = 0;
        for (RecoveredTxn& r : proof.recovered) {
            PendingTxn p;
            p.frames = std::move(r.frames);
            p.db_pages = r.db_pages;
            p.commit_us = t;
            p.end = r.end;
            p.bytes = r.bytes;
            bytes += r.bytes;
            captured_ = r.end;
            pending_.push_back(std::move(p));
        }
        pending_bytes_ += bytes;
        unshipped_bytes_.fetch_add(bytes);
        oldest_unshipped_us_.store(t);
        first_pending_time_ = Clock::now();
        log::info(path_ + ": recovered " + std::to_string(proof.recovered.size()) +
                  " transaction(s) that a WAL restart had left unshipped (frames " +
                  std::to_string(state.position.frame + 1) + ".." + std::to_string(captured_.frame) +
                  " of the previous WAL epoch)");
    }
    // Frames committed locally but never shipped (a crash): ship them now.
    if (proof.last_commit_frame > proof.unshipped_from)
        note_commit(proof.salt1, proof.salt2, proof.last_commit_frame, proof.page_size);
}

std::optional<LocalState> Replicator::bucket_end_held_locally(const GenerationInfo& g) {
    const auto& bucket = config_.bucket;
    const auto& db_id = config_.db_id;
    // Where the bucket's history of `g` ends: its last object's end position
    // and trailer (the next segment's prev_sha256).
    const std::string key = g.last_seq ? segment_key(db_id, g.id, g.last_seq) : snapshot_key(db_id, g.id);
    uint64_t size = g.snapshot_bytes;
    WalPosition end;
    if (g.last_seq) {
        auto info = client_->head_object(bucket, key);
        if (!info) return std::nullopt;
        size = info->size;
        auto h = read_segment_header(*client_, bucket, key, size);
        if (!h || h->generation != g.id || h->seq != g.last_seq) return std::nullopt;
        end = h->end;
    } else {
        auto h = read_snapshot_header(*client_, bucket, key, size);
        if (!h || h->generation != g.id) return std::nullopt;
        end = h->position;
    }
    if (size < 32) return std::nullopt;
    auto trailer = client_->get_object(bucket, key, s3::ByteRange{size - 32, 32});
    if (!trailer || trailer->size() != 32) return std::nullopt;

    // Does the local WAL hold that very position: same epoch, a commit frame
    // there with the same running checksum (compared as the bucket stores
    // it: masked under encryption)?
    auto scan = scan_wal_file(wal_path_);
    if (!scan || !scan->has_header || scan->header.salt1 != end.salt1 || scan->header.salt2 != end.salt2 ||
        end.frame > scan->last_commit_frame)
        return std::nullopt;
    WalPosition local{end.salt1, end.salt2, end.frame, scan->header.cksum1, scan->header.cksum2};
    if (end.frame > 0) {
        Fd fd(::open(wal_path_.c_str(), O_RDONLY | O_CLOEXEC));
        unsigned char fh[kWalFrameHeaderSize];
        if (fd.fd < 0 || !pread_full(fd.fd, fh, sizeof fh, wal_frame_offset(scan->header.page_size, end.frame)))
            return std::nullopt;
        auto h = parse_frame_header(fh);
        if (!h.is_commit()) return std::nullopt;
        local.cksum1 = h.cksum1;
        local.cksum2 = h.cksum2;
    }
    if (!((cipher_ ? cipher_->mask(local, db_id, g.id) : local) == end)) return std::nullopt;
    LocalState st;
    st.bucket = bucket;
    st.db_id = db_id;
    st.generation = g.id;
    st.seq = g.last_seq;
    st.prev_sha256 = s3::to_hex(reinterpret_cast<const unsigned char*>(trailer->data()), trailer->size());
    st.position = local;
    return st;
}

bool Replicator::continue_at_bucket_end(const GenerationInfo& g) {
    auto end = bucket_end_held_locally(g);
    if (!end) return false;
    LocalProof proof = prove_local(*end, path_, wal_path_);
    if (!proof.proven) return false;
    continue_from(*end, proof);
    log::info("continuing generation " + generation_ + " at segment " + std::to_string(seq_) +
              " (where the bucket's history ends, which the local WAL still holds)");
    return true;
}

Status Replicator::verify_bucket() {
    const auto& bucket = config_.bucket;
    const auto& db_id = config_.db_id;
    if (auto st = client_->create_bucket(bucket); !st) return st;
    auto gens = list_generations(*client_, bucket, db_id);
    if (!gens) return std::move(gens).error();
    const GenerationInfo* latest = nullptr;
    if (Status st = find_latest(*client_, bucket, db_id, *gens, latest); !st) return st;
    if (latest) {
        auto h = read_snapshot_header(*client_, bucket, snapshot_key(db_id, latest->id), latest->snapshot_bytes);
        if (!h) return std::move(h).error();
        if (Status st = check_cipher(h->encryption, cipher_.get(), snapshot_key(db_id, latest->id)); !st) {
            // Another writer moved the bucket to another key. Uploading under
            // ours would start a history the next open refuses: stop, say why.
            halted_.store(true);
            Error e = std::move(st).error();
            e.message = "replication stopped: " + e.message + ". The bucket's newest generation " + latest->id +
                        " is not under this database's key; reopen with initial_replication=force to start a new "
                        "generation under this key";
            return e;
        }
    }
    deferred_check_ = false;
    if (latest && latest->id == generation_ && latest->last_seq == seq_) {
        log::info(path_ + ": the bucket agrees: generation " + generation_ + " ends at segment " + std::to_string(seq_));
        return {};
    }
    // The bucket is ahead on a history this file wrote (the process died
    // between an upload and the state write, or during a snapshot it had
    // started): if the WAL still holds where that history ends, go on from
    // there. Not with frames recovered from an older epoch in hand.
    const bool ours = latest && (latest->id == generation_ ? latest->last_seq > seq_
                                                           : std::find(lineage_.begin(), lineage_.end(), latest->id) !=
                                                                 lineage_.end());
    if (ours && pending_.empty() && !inflight_ && continue_at_bucket_end(*latest)) {
        write_state_file(false);
        return {};
    }
    // The bucket moved on while we were offline (another writer, a restore
    // elsewhere, or an upload whose outcome we never learnt): a new
    // generation whose parent is the bucket's newest, so nothing there is lost.
    if (latest) {
        parent_generation_ = latest->id;
        parent_seq_ = latest->last_seq;
    }
    generation_.clear();
    {
        std::lock_guard olock(obs_mu_);
        commits_.clear();
    }
    request_snapshot(latest ? "the bucket's newest generation " + latest->id + " (segment " +
                                  std::to_string(latest->last_seq) + ") is not where this file's history ended"
                            : "the bucket holds no generation of '" + db_id + "' any more");
    return {};
}

Status Replicator::startup() {
    if (start_offline()) {
        start_uploader();
        return {};
    }
    const auto& bucket = config_.bucket;
    const auto& db_id = config_.db_id;
    if (auto st = client_->create_bucket(bucket); !st) {
        Error e = st.error();
        e.message = "cannot use bucket '" + bucket + "': " + e.message;
        return e;
    }
    auto gens = list_generations(*client_, bucket, db_id);
    if (!gens) return std::move(gens).error();
    const GenerationInfo* latest = nullptr;
    if (Status st = find_latest(*client_, bucket, db_id, *gens, latest); !st) return st;

    // Encryption: the key must be the one the newest generation was written
    // with. Anything else (no key for an encrypted replica, a key for a
    // plaintext one, another key) is refused unless initial_replication=force
    // says to start a new generation under the new setting.
    bool encryption_switch = false;
    {
        std::optional<EncryptionInfo> latest_enc;
        const std::string snap = latest ? snapshot_key(db_id, latest->id) : std::string();
        if (latest) {
            auto h = read_snapshot_header(*client_, bucket, snap, latest->snapshot_bytes);
            if (!h) return std::move(h).error();
            latest_enc = h->encryption;
        }
        const bool force = config_.initial_replication == InitialReplication::Force;
        // Takes a failed check: an error to return, or OK when forced.
        auto refuse = [&](Status st) -> Status {
            Error e = std::move(st).error();
            if (!force) {
                e.message = "cannot replicate " + path_ + ": " + e.message +
                            ". To start a new generation under this setting (turning encryption on or off, or "
                            "rotating the key), open once with initial_replication=force";
                return e;
            }
            log::warn(path_ + ": " + e.message + "; a new generation starts (initial_replication=force)");
            encryption_switch = true;
            return {};
        };
        // Encrypted or not is known from the header alone: a refused open
        // must not derive a key or create the passphrase's KDF object. (For
        // this check only whether there is a key counts, not its id.)
        const std::string any_key_id;
        if (latest && latest_enc.has_value() == config_.encryption.empty())
            if (Status st = check_key_id(latest_enc, config_.encryption.empty() ? nullptr : &any_key_id, snap); !st)
                if (Status r = refuse(std::move(st)); !r) return r;
        auto c = open_cipher(*client_, bucket, db_id, config_.encryption, /*create=*/true, &kdf_text_);
        if (!c) return std::move(c).error();
        cipher_ = std::move(c).value();
        if (latest && latest_enc && cipher_ && !encryption_switch)
            if (Status st = check_cipher(latest_enc, cipher_.get(), snap); !st)
                if (Status r = refuse(std::move(st)); !r) return r;
    }

    struct stat db_st{}, wal_st{};
    bool db_exists = stat_file(path_, db_st);
    bool wal_exists = stat_file(wal_path_, wal_st);
    bool local_empty = (!db_exists || db_st.st_size == 0) && (!wal_exists || wal_st.st_size == 0);
    auto state = read_state_file(state_path_);
    if (state && state->bucket == bucket && state->db_id == db_id) {
        // Keep only generations that exist: attempts a killed run never
        // finished would otherwise crowd out the real ones.
        for (const auto& g : state->lineage)
            if (std::any_of(gens->begin(), gens->end(), [&](const GenerationInfo& x) { return x.id == g; }))
                lineage_.push_back(g);
    }

    if (local_empty) {
        if (latest && config_.auto_restore) {
            log::info("restoring " + path_ + " from generation " + latest->id + " of s3://" + bucket + "/" + db_id);
            RestoreOptions ro;
            ro.cipher = cipher_;
            auto rr = restore_database(*client_, bucket, db_id, path_, ro);
            if (!rr) {
                Error e = std::move(rr).error();
                e.message = "cannot restore " + path_ + " from the bucket: " + e.message;
                return e;
            }
            log::info("restored " + path_ + ": generation " + rr->generation + ", " + std::to_string(rr->db_pages) +
                      " pages, last transaction at " + fmt_time_us(rr->last_commit_us));
            parent_generation_ = rr->generation;
            parent_seq_ = rr->seq;
            request_snapshot("the database was restored from the bucket");
        } else {
            request_snapshot(latest ? "auto-restore is off: a new history starts" : "first start: nothing in the bucket");
        }
    } else if (state && state->restored && state->bucket == bucket && state->db_id == db_id && db_exists &&
               (!wal_exists || wal_st.st_size == 0) && state->db_size == db_st.st_size &&
               state->db_mtime_ns == mtime_ns(db_st) && state->db_ino == db_st.st_ino) {
        // Restored by bottomless-cli and untouched since: a new history whose
        // parent is the restored state (even if the bucket moved on: restoring
        // an older point in time and starting from it is a rollback).
        parent_generation_ = state->generation;
        parent_seq_ = state->seq;
        request_snapshot("the database was restored from generation " + state->generation);
    } else if (encryption_switch) {
        parent_generation_ = latest->id;
        parent_seq_ = latest->last_seq;
        request_snapshot(cipher_ ? "encryption changed: key id " + cipher_->key_id() : "encryption turned off");
    } else if (!latest) {
        request_snapshot("first start: the bucket has no generation of '" + db_id + "'");
    } else if (state && state->bucket == bucket && state->db_id == db_id && state->generation == latest->id) {
        // We wrote the bucket's newest generation. Continue it only if the
        // local files still are exactly where that history ends.
        LocalProof proof = latest->last_seq == state->seq ? prove_local(*state, path_, wal_path_) : LocalProof{};
        if (proof.proven) {
            continue_from(*state, proof);
            log::info("continuing generation " + generation_ + " at segment " + std::to_string(seq_));
        } else if (continue_at_bucket_end(*latest)) {
        } else {
            parent_generation_ = latest->id;
            parent_seq_ = latest->last_seq;
            request_snapshot("the local files do not match where the bucket's history ends (local changes, or an "
                             "upload whose outcome was unknown)");
        }
    } else if (state && state->bucket == bucket && state->db_id == db_id &&
               std::find(state->lineage.begin(), state->lineage.end(), latest->id) != state->lineage.end()) {
        // The bucket's newest generation was started from this file (the last
        // run may have died before recording how far it got): the local file
        // is at least as new. If the WAL still holds where it ends, go on
        // from there; otherwise where it ends is not proven.
        if (!continue_at_bucket_end(*latest)) {
            parent_generation_ = latest->id;
            parent_seq_ = latest->last_seq;
            request_snapshot("this file started generation " + latest->id + " but its end is not recorded");
        }
    } else {
        std::string why = state && state->bucket == bucket && state->db_id == db_id
                              ? "the bucket's newest generation " + latest->id + " is not the one this file was last "
                                    "replicated to (" + state->generation + "): another writer, or a restore elsewhere"
                              : "this file has no replication state for this bucket, so nothing proves they match";
        switch (config_.initial_replication) {
        case InitialReplication::Skip:
            log::warn(path_ + ": replication skipped for this run (LIBSQL_BOTTOMLESS_INITIAL_REPLICATION=skip): " + why);
            enabled_ = false;
            return {};
        case InitialReplication::Force:
            log::warn(path_ + ": replicating the local file as a new generation (initial_replication=force): " + why);
            parent_generation_ = latest->id;
            parent_seq_ = latest->last_seq;
            request_snapshot("forced by initial_replication=force");
            break;
        case InitialReplication::Error:
            return make_error(
                ErrorKind::InvalidArgument,
                "local database " + path_ + " and s3://" + bucket + "/" + db_id + " disagree: " + why +
                    ". Set LIBSQL_BOTTOMLESS_INITIAL_REPLICATION=force (or initial_replication=force) to replicate "
                    "the local file as a new generation, =skip to open it without replication, or move the local "
                    "file away to restore it from the bucket",
                "ReplicaMismatch");
        }
    }

    start_uploader();
    return {};
}

void Replicator::start_uploader() {
    db_fd_ = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);  // may not exist yet: opened on first snapshot
    thread_ = std::thread([this] { run(); });
}

Replicator::~Replicator() {
    // The final flush runs without the registry's lock; an open of this
    // path meanwhile waits for the entry to go (below).
    if (thread_.joinable()) {
        {
            std::lock_guard lock(cv_mu_);
            stop_ = true;
            force_ = true;
        }
        cv_.notify_all();
        thread_.join();
    }
    if (enabled_) write_state_file(/*clean_close=*/true);
    if (db_fd_ >= 0) ::close(db_fd_);  // the last connection is gone: no SQLite lock can be dropped
    // Before the entry goes: the next replicator of this path (perhaps in
    // this process) must find the leadership free.
    leader_lock_.reset();
    if (registered_) {
        {
            std::lock_guard lock(registry_mu());
            auto it = registry().find(path_);
            if (it != registry().end() && !it->second.opening && it->second.replicator.expired()) registry().erase(it);
        }
        registry_cv().notify_all();
    }
}

// ---------------------------------------------------------------------------
// VFS events

void Replicator::note_commit(uint32_t salt1, uint32_t salt2, uint64_t frame, uint32_t page_size) {
    if (!enabled_) return;
    std::lock_guard lock(obs_mu_);
    if (salt1 == last_noted_salt1_ && salt2 == last_noted_salt2_ && frame == last_noted_frame_) return;
    uint64_t frames = (salt1 == last_noted_salt1_ && salt2 == last_noted_salt2_ && frame > last_noted_frame_)
                          ? frame - last_noted_frame_
                          : frame;
    last_noted_salt1_ = salt1;
    last_noted_salt2_ = salt2;
    last_noted_frame_ = frame;
    if (frame == 0) return;  // a restart without frames yet: nothing to ship
    Commit c{salt1, salt2, frame, now_us(), noted_index_.load() + 1};
    commits_.push_back(c);
    int64_t zero = 0;
    oldest_unshipped_us_.compare_exchange_strong(zero, c.time_us);
    noted_index_.store(c.index);
    unshipped_bytes_.fetch_add(frames * (page_size ? page_size : 4096));
}

bool Replicator::restart_allowed() const {
    if (!enabled_) return true;
    return durable_index_.load() >= noted_index_.load() && !snapshot_active_.load();
}

bool Replicator::restart_allowed(uint32_t salt1, uint32_t salt2, uint64_t mx_frame) const {
    if (!enabled_) return true;
    if (snapshot_active_.load()) return false;  // the snapshot reads WAL frames
    uint64_t salts = (static_cast<uint64_t>(salt1) << 32) | salt2;
    if (mx_frame == 0 || (durable_salts_.load() == salts && durable_frame_.load() >= mx_frame)) return true;
    // Not durable yet: the restart may go ahead if the frames are in memory
    // (the tee, or pending transactions) and fit there; the WAL keeps them
    // otherwise. They are in the checkpointed database file too: SQLite
    // restarts only after a complete checkpoint.
    return !tee_.has_hole() && unshipped_bytes_.load() <= config_.max_pending_bytes;
}

void Replicator::check_wal_index(uint32_t salt1, uint32_t salt2, uint64_t mx_frame) {
    if (!enabled_) return;
    std::lock_guard lock(obs_mu_);
    if (last_noted_salt1_ == 0 && last_noted_salt2_ == 0) return;  // nothing observed yet
    bool same_epoch = salt1 == last_noted_salt1_ && salt2 == last_noted_salt2_;
    // A restart we did not see, or a WAL that shrank: frames may have been
    // lost to a writer outside bottomless. Frames it appended in the same
    // epoch are fine: the next observation ships them.
    if (!same_epoch || mx_frame < last_noted_frame_) foreign_writer_.store(true);
}

void Replicator::note_checkpoint(bool active) { checkpoints_active_.fetch_add(active ? 1 : -1); }

void Replicator::note_write_outside_wal() {
    if (!enabled_) return;
    broken_outside_wal_.store(true);
    snapshot_torn_.store(true);
}

void Replicator::note_db_write() {
    if (snapshot_active_.load()) snapshot_torn_.store(true);
}

void Replicator::note_wal_open(bool open) { wal_open_.fetch_add(open ? 1 : -1); }

void Replicator::wake() {
    {
        std::lock_guard lock(cv_mu_);
        wake_ = true;
    }
    cv_.notify_all();
}

bool Replicator::wal_write_allowed(uint64_t end) {
    if (end > wal_bytes_.load()) wal_bytes_.store(end);
    if (!enabled_ || config_.max_wal_bytes == 0 || end <= config_.max_wal_bytes) return true;
    // Over the budget. Ours to answer only while unshipped frames are what
    // keeps the WAL from restarting; a WAL grown by the application's own
    // long readers or transactions is SQLite's business.
    if (durable_index_.load() >= noted_index_.load()) return true;
    if (!wal_over_budget_.exchange(true)) {
        const std::string m = path_ + ": the WAL has grown past max_wal_bytes (" +
                              std::to_string(config_.max_wal_bytes >> 20) +
                              " MiB) because committed transactions are not in S3 yet (" +
                              std::to_string(unshipped_bytes_.load() >> 20) + " MiB unshipped; check bottomless_status() "
                              "last_error). " +
                              (config_.wal_budget_fail ? "Writes fail with SQLITE_FULL until S3 catches up "
                                                         "(wal_budget_policy=fail)"
                                                       : "Writes go on and the WAL keeps growing "
                                                         "(wal_budget_policy=warn)");
        log::warn(m);
        std::lock_guard lock(status_mu_);
        last_error_ = m;
        last_error_us_ = now_us();
    }
    return !config_.wal_budget_fail;
}

// ---------------------------------------------------------------------------
// Capture: committed WAL frames into pending transactions

std::optional<WalHeader> Replicator::epoch_header(uint32_t salt1, uint32_t salt2, WalFile& wal) {
    if (epoch_hdr_ && epoch_hdr_->salt1 == salt1 && epoch_hdr_->salt2 == salt2) return epoch_hdr_;
    auto h = tee_.header(salt1, salt2);
    if (!h) h = wal.header();
    if (!h || h->salt1 != salt1 || h->salt2 != salt2) return std::nullopt;
    epoch_hdr_ = h;
    return h;
}

Status Replicator::frames_to_txns(const WalHeader& hdr, uint64_t from, std::vector<TeeFrame>& frames, WalPosition& pos,
                                  std::vector<PendingTxn>& out, int64_t commit_us, uint64_t commit_index) {
    const uint32_t psz = hdr.page_size;
    const uint64_t to = from + frames.size() - 1;
    uint32_t s1 = pos.cksum1, s2 = pos.cksum2;
    PendingTxn cur;
    for (uint64_t i = from; i <= to; ++i) {
        TeeFrame& f = frames[static_cast<size_t>(i - from)];
        if (f.page.size() != psz || !verify_frame(hdr, f.header, reinterpret_cast<const unsigned char*>(f.page.data()), s1, s2))
            return make_error(ErrorKind::Corrupt,
                              "WAL frame " + std::to_string(i) + " does not continue the checksum chain", "WalChain");
        WalFrameHeader fh = parse_frame_header(f.header);
        cur.frames.push_back(SegmentFrame{fh.pgno, std::move(f.page)});
        cur.bytes += psz;
        if (fh.is_commit()) {
            cur.db_pages = fh.db_size;
            cur.commit_us = commit_us;
            cur.commit_index = i == to ? commit_index : commit_index - 1;
            cur.end = WalPosition{hdr.salt1, hdr.salt2, i, s1, s2};
            pos = cur.end;
            out.push_back(std::move(cur));
            cur = PendingTxn{};
        }
    }
    if (!cur.frames.empty())
        return make_error(ErrorKind::Corrupt, "WAL frame " + std::to_string(to) + " does not end a transaction",
                          "WalChain");
    return {};
}

Status Replicator::capture_range(const WalHeader& hdr, uint64_t from, uint64_t to, WalFile& wal, int64_t commit_us,
                                 uint64_t commit_index) {
    std::vector<TeeFrame> frames;
    std::vector<PendingTxn> txns;
    WalPosition pos = captured_;
    Status st = make_error(ErrorKind::Corrupt, "not in the tee", "TeeMiss");
    if (tee_.take(hdr.salt1, hdr.salt2, from, to, frames)) {
        st = frames_to_txns(hdr, from, frames, pos, txns, commit_us, commit_index);
        if (!st) log::debug(path_ + ": tee frames " + std::to_string(from) + ".." + std::to_string(to) +
                            " fail the checksum chain; reading them from the WAL");
    }
    if (!st) {
        // Frames this process did not write, or did not keep (memory): the
        // WAL still holds them (a restart waits until they are durable).
        frames.clear();
        txns.clear();
        pos = captured_;
        if (!wal.read(hdr.page_size, from, to, frames))
            return make_error(ErrorKind::Corrupt, "WAL frames " + std::to_string(from) + ".." + std::to_string(to) +
                                                      " are missing or short", "WalShort");
        wal_frames_read_.fetch_add(to - from + 1);
        st = frames_to_txns(hdr, from, frames, pos, txns, commit_us, commit_index);
        if (!st) return st;
    }
    uint64_t bytes = 0;
    for (auto& t : txns) {
        bytes += t.bytes;
        pending_.push_back(std::move(t));
    }
    pending_bytes_ += bytes;
    captured_ = pos;
    return {};
}

Status Replicator::capture() {
    std::deque<Commit> todo;
    {
        std::lock_guard lock(obs_mu_);
        todo.swap(commits_);
    }
    if (todo.empty()) return {};
    WalFile wal(wal_path_);
    Status result;
    while (!todo.empty()) {
        if (pending_bytes_ >= config_.max_pending_bytes) break;  // the WAL keeps the rest
        Commit c = todo.front();
        if (c.salt1 != captured_.salt1 || c.salt2 != captured_.salt2) {
            auto hdr = epoch_header(c.salt1, c.salt2, wal);
            if (!hdr) {
                request_snapshot("the WAL was restarted before its frames could be read (a writer outside bottomless?)");
                todo.clear();
                break;
            }
            if (page_size_ && hdr->page_size != page_size_) {
                request_snapshot("the page size changed");
                todo.clear();
                break;
            }
            page_size_ = hdr->page_size;
            captured_ = WalPosition{hdr->salt1, hdr->salt2, 0, hdr->cksum1, hdr->cksum2};
        }
        if (c.frame <= captured_.frame) {
            // Already covered (by a snapshot or an earlier observation).
            if (!pending_.empty()) pending_.back().commit_index = std::max(pending_.back().commit_index, c.index);
            else if (!inflight_) {
                uint64_t d = durable_index_.load();
                if (c.index > d) durable_index_.store(c.index);
            }
            todo.pop_front();
            continue;
        }
        auto hdr = epoch_header(captured_.salt1, captured_.salt2, wal);
        if (!hdr) {
            request_snapshot("the WAL was restarted before its frames could be read (a writer outside bottomless?)");
            todo.clear();
            break;
        }
        if (pending_.empty() && !inflight_) first_pending_time_ = Clock::now();
        auto st = capture_range(*hdr, captured_.frame + 1, c.frame, wal, c.time_us, c.index);
        if (!st) {
            request_snapshot("WAL continuity broken: " + st.error().message);
            todo.clear();
            result = st;
            break;
        }
        todo.pop_front();
    }
    if (!todo.empty()) {
        std::lock_guard lock(obs_mu_);
        commits_.insert(commits_.begin(), todo.begin(), todo.end());
    }
    tee_.trim(captured_.salt1, captured_.salt2, captured_.frame);
    tee_.captured_through(captured_.salt1, captured_.salt2, captured_.frame);
    return result;
}

// ---------------------------------------------------------------------------
// Upload

void Replicator::record_error(const Error& e) {
    log::warn(path_ + ": replication: " + e.describe());
    std::lock_guard lock(status_mu_);
    last_error_ = e.describe();
    last_error_us_ = now_us();
    ++errors_;
}

void Replicator::note_failure(const Error& e) {
    record_error(e);
    ++consecutive_failures_;
    // 0.5 s, 1 s, 2 s, ... up to 30 s before the uploader tries again by itself.
    retry_after_ = Clock::now() +
                   std::chrono::milliseconds(std::min<int64_t>(30'000, 250ll << std::min(consecutive_failures_, 7)));
}

void Replicator::mark_durable(const WalPosition& pos, uint64_t commit_index) {
    durable_ = pos;
    // A restart record is obsolete once its epoch's frames are all durable.
    if (restarted_.frame &&
        (pos.salt1 != restarted_.salt1 || pos.salt2 != restarted_.salt2 || pos.frame >= restarted_.frame))
        restarted_ = WalPosition{};
    durable_salts_.store((static_cast<uint64_t>(pos.salt1) << 32) | pos.salt2);
    durable_frame_.store(pos.frame);
    if (commit_index > durable_index_.load()) durable_index_.store(commit_index);
    if (durable_index_.load() >= noted_index_.load()) {
        oldest_unshipped_us_.store(0);
    } else {
        int64_t oldest = 0;
        if (!pending_.empty()) oldest = pending_.front().commit_us;
        else {
            std::lock_guard lock(obs_mu_);
            if (!commits_.empty()) oldest = commits_.front().time_us;
        }
        oldest_unshipped_us_.store(oldest ? oldest : now_us());
    }
    {
        std::lock_guard lock(status_mu_);
        status_generation_ = generation_;
        status_seq_ = seq_;
        status_durable_ = pos;
        last_error_.clear();
    }
    {
        std::lock_guard lock(cv_mu_);
    }
    durable_cv_.notify_all();
}

Status Replicator::upload_inflight(Lock& lock) {
    InFlight& f = *inflight_;
    s3::PutOptions o;
    o.if_none_match = true;  // a segment is written once; a second writer must not overwrite it
    o.content_type = "application/vnd.bottomless.segment";
    std::string key = segment_key(config_.db_id, generation_, f.header.seq);
    // inflight_ changes only under net_mu_ (held by our caller), so it stays
    // put while upload_mu_ is released for the request.
    lock.unlock();
    auto r = client_->put_object(config_.bucket, key, f.bytes, o);
    lock.lock();
    if (!r) {
        if (r.error().kind == ErrorKind::Precondition) {
            // Someone else's segment sits at our key: this history forked.
            record_error(make_error(ErrorKind::Precondition,
                                    key + " already exists with other content (another writer on this generation?); "
                                          "starting a new generation",
                                    "Fork"));
            inflight_.reset();
            pending_.clear();
            pending_bytes_ = 0;
            request_snapshot("segment key taken by another writer");
            return r.error();
        }
        note_failure(r.error());
        return std::move(r).error();
    }
    consecutive_failures_ = 0;
    seq_ = f.header.seq;
    prev_sha256_ = f.sha256;
    uint64_t raw = 0;
    for (const auto& t : f.header.txns) raw += static_cast<uint64_t>(t.frames) * f.header.page_size;
    wal_bytes_since_snapshot_ += raw;
    uint64_t u = unshipped_bytes_.load();
    unshipped_bytes_.store(u > raw ? u - raw : 0);
    {
        std::lock_guard lock(status_mu_);
        ++segments_uploaded_;
        bytes_uploaded_ += f.bytes.size();
        segment_bytes_uploaded_ += f.bytes.size();
        wal_bytes_shipped_ += raw;
        if (!f.header.txns.empty()) last_durable_commit_us_ = f.header.txns.back().commit_us;
    }
    WalPosition end = f.header.end;
    uint64_t idx = f.commit_index;
    inflight_.reset();
    mark_durable(end, idx);
    write_state_file(false);
    return {};
}

Status Replicator::upload_pending(Lock& lock, bool force, Clock::time_point deadline) {
    for (;;) {
        if (inflight_) {
            if (auto st = upload_inflight(lock); !st) return st;
            continue;
        }
        if (pending_.empty()) return {};
        if (generation_.empty() || need_snapshot_) return {};  // the next snapshot covers them
        bool due = force || pending_bytes_ >= config_.batch_max_bytes ||
                   Clock::now() - first_pending_time_ >= config_.batch_interval;
        if (!due) return {};
        if (Clock::now() > deadline)
            return make_error(ErrorKind::Cancelled, "deadline passed before everything was shipped", "Timeout");

        InFlight f;
        f.header.db_id = config_.db_id;
        f.header.generation = generation_;
        f.header.seq = seq_ + 1;
        f.header.page_size = page_size_;
        f.header.start = durable_;
        f.header.prev_sha256 = prev_sha256_;
        f.header.compression = config_.compression;
        std::vector<SegmentFrame> frames;
        uint64_t bytes = 0;
        size_t n = 0;
        // A segment must stay within what readers accept (format.h): its
        // header under kMaxHeaderSize, its decoded body under
        // kMaxSegmentBodyBytes. One transaction larger than that goes into
        // the bucket as a snapshot instead.
        auto body = [&](const PendingTxn& t) { return t.frames.size() * (4 + uint64_t{page_size_}); };
        if (body(pending_.front()) > kMaxSegmentBodyBytes) {
            request_snapshot("a transaction of " + std::to_string(pending_.front().frames.size()) +
                             " pages is larger than a segment may hold");
            return {};
        }
        uint64_t seg_body = 0;
        while (n < pending_.size() && n < kMaxSegmentTxns && seg_body + body(pending_[n]) <= kMaxSegmentBodyBytes &&
               (n == 0 || bytes + pending_[n].bytes <= config_.batch_max_bytes)) {
            seg_body += body(pending_[n]);
            PendingTxn& t = pending_[n];
            f.header.txns.push_back(SegmentTxn{static_cast<uint32_t>(t.frames.size()), t.db_pages, t.commit_us});
            bytes += t.bytes;
            for (auto& fr : t.frames) frames.push_back(std::move(fr));
            f.header.end = t.end;
            f.commit_index = t.commit_index;
            ++n;
        }
        pending_.erase(pending_.begin(), pending_.begin() + static_cast<std::ptrdiff_t>(n));
        pending_bytes_ -= std::min(pending_bytes_.load(), bytes);
        // Compressing (and encrypting) up to batch_max_bytes takes a while:
        // not under upload_mu_, which a writer restarting the WAL needs.
        // net_mu_ (held by our caller) keeps other uploads out meanwhile.
        lock.unlock();
        f.bytes = encode_segment(f.header, frames, &f.sha256, cipher_.get());
        lock.lock();
        inflight_ = std::move(f);
        if (!pending_.empty()) first_pending_time_ = Clock::now();
    }
}

void Replicator::request_snapshot(const std::string& reason) {
    if (!need_snapshot_) log::info(path_ + ": new generation needed: " + reason);
    need_snapshot_ = true;
    snapshot_reason_ = reason;
}

Status Replicator::take_snapshot(Lock& lock) {
    // Ship what the current generation can still take, so its history ends
    // as late as possible; a failure here does not stop the new generation.
    if (!generation_.empty() && (!pending_.empty() || inflight_))
        (void)upload_pending(lock, true, Clock::now() + std::chrono::seconds(5));
    if (!generation_.empty()) {
        parent_generation_ = generation_;
        parent_seq_ = seq_;
    }

    struct Guard {
        std::atomic<bool>& flag;
        ~Guard() { flag.store(false); }
    } guard{snapshot_active_};
    snapshot_active_.store(true);
    snapshot_torn_.store(false);
    // Wait for a checkpoint already running in this process to finish: the
    // database file must stay still while it is read.
    for (int i = 0; checkpoints_active_.load() > 0 && i < 10'000; ++i)
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    if (checkpoints_active_.load() > 0)
        return make_error(ErrorKind::Cancelled, "a checkpoint did not finish; snapshot postponed", "Busy");

    const uint64_t idx0 = noted_index_.load();
    if (db_fd_ < 0) db_fd_ = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
    unsigned char dbh[100] = {0};
    struct stat st{};
    bool have_db = db_fd_ >= 0 && ::fstat(db_fd_, &st) == 0 && st.st_size >= 100 && pread_full(db_fd_, dbh, 100, 0);
    auto scan = scan_wal_file(wal_path_);
    if (!scan) return std::move(scan).error();
    // Every transaction the snapshot holds committed before this instant:
    // its last_commit_us, so a point-in-time restore never takes it for a
    // state older than it is.
    const int64_t scanned_us = now_us();
    uint32_t psz = scan->has_header ? scan->header.page_size : (have_db ? db_header_page_size(dbh) : 0);
    if (have_db && db_header_page_size(dbh) != psz)
        return make_error(ErrorKind::Corrupt, "database and WAL page sizes differ", "PageSize");
    uint32_t db_pages = scan->last_commit_frame ? scan->db_size
                                                : (have_db ? static_cast<uint32_t>(st.st_size / psz) : 0);
    if (db_pages == 0 || psz == 0) {
        // Nothing to snapshot yet (a new, empty database): the first commit will be.
        return {};
    }
    WalPosition pos;
    if (scan->has_header)
        pos = WalPosition{scan->header.salt1, scan->header.salt2, scan->last_commit_frame, scan->cksum1, scan->cksum2};

    // Latest WAL frame of each page up to the snapshot position.
    std::unordered_map<uint32_t, uint64_t> latest;
    Fd wal(scan->last_commit_frame ? ::open(wal_path_.c_str(), O_RDONLY | O_CLOEXEC) : -1);
    for (uint64_t i = 1; i <= scan->last_commit_frame; ++i) {
        unsigned char fh[kWalFrameHeaderSize];
        if (!pread_full(wal.fd, fh, sizeof fh, wal_frame_offset(psz, i)))
            return make_error(ErrorKind::Io, "cannot read WAL frame " + std::to_string(i), "WalRead");
        latest[parse_frame_header(fh).pgno] = i;
    }

    std::string gen = new_generation_id(now_us() / 1000);
    SnapshotHeader h;
    h.db_id = config_.db_id;
    h.generation = gen;
    h.page_size = psz;
    h.db_pages = db_pages;
    h.created_us = now_us();
    {
        std::lock_guard lock(status_mu_);
        h.last_commit_us = last_durable_commit_us_;
    }
    if (idx0 > 0 || scan->last_commit_frame > 0) h.last_commit_us = scanned_us;
    h.position = pos;
    h.parent_generation = parent_generation_;
    h.parent_seq = parent_seq_;
    h.compression = config_.compression;

    std::string key = snapshot_key(config_.db_id, gen);
    // Ours from now on, even if this process dies before the upload ends.
    lineage_.insert(lineage_.begin(), gen);
    if (lineage_.size() > 64) lineage_.resize(64);
    write_state_file(false);
    auto writer = client_->open_writer(config_.bucket, key, s3::PutOptions{});
    SnapshotWriter sw(h, [&](std::string_view piece) { return writer->write(piece); }, cipher_.get());
    std::string page(psz, '\0');
    for (uint32_t pgno = 1; pgno <= db_pages; ++pgno) {
        auto it = latest.find(pgno);
        bool ok;
        if (it != latest.end()) {
            ok = pread_full(wal.fd, page.data(), psz, wal_frame_offset(psz, it->second) + kWalFrameHeaderSize);
        } else if (static_cast<uint64_t>(pgno) * psz <= static_cast<uint64_t>(st.st_size)) {
            ok = pread_full(db_fd_, page.data(), psz, static_cast<uint64_t>(pgno - 1) * psz);
        } else {
            std::fill(page.begin(), page.end(), '\0');  // never written (e.g. the lock page)
            ok = true;
        }
        if (!ok) return make_error(ErrorKind::Io, "cannot read page " + std::to_string(pgno) + " of " + path_, "ReadError");
        if (auto s = sw.add_page(page); !s) return s;
    }
    auto sha = sw.finish();
    if (!sha) return std::move(sha).error();
    // Whatever wrote meanwhile, whichever path it took, must be caught: the
    // database file's mtime/size and the WAL header and last frame must be as
    // they were when the position was chosen. The WAL check closes a real
    // race: a writer whose restart was staged (flush_before_wal_loss) just
    // before this snapshot took upload_mu_ writes the new WAL header and
    // overwrites frames while the snapshot reads them. SQLite writes the
    // header before any frame, so an unchanged header proves no frame moved.
    struct stat st_after{};
    bool db_moved = db_fd_ >= 0 && (::fstat(db_fd_, &st_after) != 0 || st_after.st_size != st.st_size ||
                    st_after.st_mtim.tv_sec != st.st_mtim.tv_sec || st_after.st_mtim.tv_nsec != st.st_mtim.tv_nsec);
    bool wal_moved = false;
    if (scan->last_commit_frame) {
        unsigned char hdr2[kWalHeaderSize], fh2[kWalFrameHeaderSize];
        wal_moved = !pread_full(wal.fd, hdr2, sizeof hdr2, 0) ||
                    !pread_full(wal.fd, fh2, sizeof fh2, wal_frame_offset(psz, scan->last_commit_frame));
        if (!wal_moved) {
            auto h2 = parse_wal_header(hdr2);
            auto f2 = parse_frame_header(fh2);
            wal_moved = !h2 || h2->salt1 != pos.salt1 || h2->salt2 != pos.salt2 || f2.cksum1 != pos.cksum1 ||
                        f2.cksum2 != pos.cksum2;
        }
    }
    if (snapshot_torn_.load() || db_moved || wal_moved) {
        writer->abort();
        std::string what = snapshot_torn_.load() ? "a checkpoint wrote the database file"
                           : db_moved            ? "the database file changed on disk"
                                                 : "the WAL changed under the snapshot position";
        return make_error(ErrorKind::Cancelled, what + " while the snapshot was read; retrying", "SnapshotTorn");
    }
    // Every page has been read: a write from now on cannot tear what was read.
    auto put = writer->finish();
    if (!put) return std::move(put).error();

    log::info(path_ + ": generation " + gen + " started (" + snapshot_reason_ + "): " + std::to_string(db_pages) +
              " pages, " + std::to_string(put->size) + " bytes");
    generation_ = gen;
    seq_ = 0;
    prev_sha256_ = *sha;
    page_size_ = psz;
    captured_ = pos;
    if (scan->has_header) epoch_hdr_ = scan->header;
    tee_.trim(pos.salt1, pos.salt2, pos.frame);
    pending_.clear();
    pending_bytes_ = 0;
    inflight_.reset();
    need_snapshot_ = false;
    broken_outside_wal_.store(false);
    parent_generation_.clear();
    parent_seq_ = 0;
    wal_bytes_since_snapshot_ = 0;
    last_snapshot_time_ = Clock::now();
    unshipped_bytes_.store(0);
    {
        std::lock_guard lock(status_mu_);
        ++snapshots_uploaded_;
        bytes_uploaded_ += put->size;
        if (h.last_commit_us) last_durable_commit_us_ = h.last_commit_us;
    }
    mark_durable(pos, idx0);
    write_state_file(false);
    return {};
}

namespace {
std::atomic<int> g_injected_uploader_exceptions{0};
}

void testing_inject_uploader_exceptions(int n) { g_injected_uploader_exceptions.store(n); }

Status Replicator::check_bucket_first() {
    if (halted_.load()) {
        std::lock_guard lock(status_mu_);
        return make_error(ErrorKind::InvalidArgument, last_error_, "ReplicationStopped");
    }
    if (!deferred_check_) return {};
    Status st = verify_bucket();
    if (!st) note_failure(st.error());
    return st;
}

void Replicator::guarded_step(Lock& lock, bool force) noexcept {
    // The uploader thread's exception barrier: an exception leaving a
    // thread's entry point terminates the host application. A step that
    // throws (out of memory, a library failure) is recorded in status and
    // retried after the usual back-off; the application never notices.
    auto fail = [this](const char* what) noexcept {
        try {
            note_failure(make_error(ErrorKind::Io, std::string("internal error in the uploader: ") + what +
                                                       " (retrying; the application is not affected)",
                                    "UploaderException"));
        } catch (...) {
            retry_after_ = Clock::now() + std::chrono::seconds(1);
        }
    };
    try {
        if (g_injected_uploader_exceptions.load() > 0 && g_injected_uploader_exceptions.fetch_sub(1) > 0)
            throw std::runtime_error("injected by a test");
        (void)step(lock, force);
    } catch (const std::bad_alloc&) {
        fail("out of memory");
    } catch (const std::exception& e) {
        fail(e.what());
    } catch (...) {
        fail("unknown exception");
    }
}

Status Replicator::step(Lock& lock, bool force) {
    if (!force && Clock::now() < retry_after_) return {};
    if (Status st = check_bucket_first(); !st) return st;
    if (broken_outside_wal_.load()) request_snapshot("the database file was written outside the WAL");
    if (foreign_writer_.exchange(false))
        request_snapshot("the WAL changed behind bottomless's back (another process writing without it?)");
    if (need_snapshot_) {
        // Observations up to now are inside the snapshot.
        {
            std::lock_guard lock(obs_mu_);
            commits_.clear();
        }
        auto st = take_snapshot(lock);
        if (!st) {
            note_failure(st.error());
            return st;
        }
        consecutive_failures_ = 0;
        if (need_snapshot_) return {};  // nothing to snapshot yet
    }
    (void)capture();
    if (config_.snapshot_after_bytes && wal_bytes_since_snapshot_ > config_.snapshot_after_bytes)
        request_snapshot("snapshot policy: " + std::to_string(wal_bytes_since_snapshot_) + " WAL bytes since the last one");
    else if (config_.snapshot_interval.count() > 0 && Clock::now() - last_snapshot_time_ > config_.snapshot_interval)
        request_snapshot("snapshot policy: interval elapsed");
    return upload_pending(lock, force, Clock::now() + std::chrono::hours(1));
}

void Replicator::run() {
    for (;;) {
        bool stopping, force;
        {
            std::unique_lock lock(cv_mu_);
            auto wait = std::min<std::chrono::milliseconds>(config_.batch_interval / 4 + std::chrono::milliseconds(1),
                                                            std::chrono::milliseconds(250));
            cv_.wait_for(lock, wait, [&] { return stop_ || wake_; });
            stopping = stop_;
            force = force_ || stopping;
            wake_ = false;
            force_ = false;
        }
        {
            std::lock_guard net(net_mu_);
            Lock lock(upload_mu_);
            guarded_step(lock, force);
        }
        if (stopping) break;
    }
    // Closing: ship everything committed, bounded by the shutdown timeout.
    auto deadline = Clock::now() + config_.shutdown_timeout;
    while (Clock::now() < deadline) {
        {
            std::lock_guard net(net_mu_);
            Lock lock(upload_mu_);
            retry_after_ = {};
            guarded_step(lock, true);
            bool done = durable_index_.load() >= noted_index_.load() && pending_.empty() && !inflight_ &&
                        (!need_snapshot_ || generation_.empty());
            if (done && !need_snapshot_) return;
            if (done && need_snapshot_ && consecutive_failures_ == 0) return;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    log::warn(path_ + ": closing with committed transactions not in S3 after " +
              std::to_string(config_.shutdown_timeout.count()) +
              " ms; they stay in the local WAL and are shipped at the next open");
}

// ---------------------------------------------------------------------------
// Blocking calls from the VFS and the SQL functions

Status Replicator::flush_before_wal_loss(const char* why, std::chrono::milliseconds timeout) {
    if (!enabled_ || restart_allowed()) return {};
    // SQLite only restarts, truncates or deletes the WAL after a complete
    // checkpoint, so every committed frame is already in the (synced)
    // database file. The frames not yet durable stay in memory: in the tee
    // (nothing to do here but record how far the epoch went), or, when the
    // tee lacks some, read into pending transactions now. Only when memory
    // is full does the writer wait for the network.
    {
        Lock lock(upload_mu_);
        uint32_t s1, s2;
        uint64_t last;
        bool one_epoch = true;
        {
            std::lock_guard olock(obs_mu_);
            s1 = last_noted_salt1_;
            s2 = last_noted_salt2_;
            last = last_noted_frame_;
            for (const Commit& c : commits_) one_epoch = one_epoch && c.salt1 == s1 && c.salt2 == s2;
        }
        const bool same = captured_.salt1 == s1 && captured_.salt2 == s2;
        const uint64_t from = same ? captured_.frame + 1 : 1;
        bool in_memory = one_epoch && tee_.holds(s1, s2, from, last) && (same || tee_.header(s1, s2));
        if (!in_memory) {
            (void)capture();  // what the tee lacks is read from the WAL here (rare: memory was full)
            std::lock_guard olock(obs_mu_);
            in_memory = commits_.empty();
        }
        if (in_memory) {
            // The epoch goes while some of its frames are only in memory:
            // say how far it went before it does, so that after a crash the
            // next start can read them back from the WAL file's old slots
            // (or, if overwritten, knows it cannot prove the history).
            if (!generation_.empty() && last > durable_.frame && s1 == durable_.salt1 && s2 == durable_.salt2) {
                restarted_ = WalPosition{s1, s2, last, 0, 0};
                if (!write_state_file(false)) {
                    // An old state without the record would "prove" a history
                    // that lacks these frames: remove it, or refuse the restart.
                    if (::unlink(state_path_.c_str()) != 0 && errno != ENOENT)
                        return make_error(ErrorKind::Io, std::string("cannot ") + why + ": cannot record it in " +
                                                             state_path_, "StateFile");
                }
            }
            return {};
        }
    }
    wake();
    auto deadline = Clock::now() + timeout;
    while (!restart_allowed()) {
        {
            std::lock_guard net(net_mu_);
            Lock lock(upload_mu_);
            retry_after_ = {};
            auto st = step(lock, true);
            bool all_captured;
            {
                std::lock_guard olock(obs_mu_);
                all_captured = commits_.empty();
            }
            if (restart_allowed() || all_captured) break;
            if (Clock::now() >= deadline)
                return make_error(ErrorKind::Transport,
                                  std::string("cannot ") + why + ": committed transactions are not yet in S3" +
                                      (st.ok() ? "" : " (" + st.error().describe() + ")"),
                                  "Unshipped");
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return {};
}

Status Replicator::commit_sync(uint64_t frame, const unsigned char* frame_header, const unsigned char* page,
                               uint32_t page_size) {
    if (!enabled_) return {};
    std::lock_guard net(net_mu_);
    Lock lock(upload_mu_);
    auto deadline = Clock::now() + config_.sync_timeout;
    if (Status st = check_bucket_first(); !st) return st;
    if (need_snapshot_ || generation_.empty()) {
        {
            std::lock_guard olock(obs_mu_);
            commits_.clear();
        }
        if (auto st = take_snapshot(lock); !st) return st;
    }
    (void)capture();
    if (need_snapshot_) {
        if (auto st = take_snapshot(lock); !st) return st;
    }
    // Every request for this commit ends by its deadline, also one that a
    // server trickles or hangs (the retry policy alone would only stop
    // between attempts). A snapshot above is bounded by the retry budget
    // instead: cut at sync_timeout, a large one could never complete.
    s3::DeadlineScope request_deadline(deadline);
    WalFile wal(wal_path_);
    WalFrameHeader fh = parse_frame_header(frame_header);
    auto hdr = epoch_header(fh.salt1, fh.salt2, wal);
    if (!hdr || hdr->page_size != page_size)
        return make_error(ErrorKind::Corrupt, "the WAL header does not match the frame being committed", "WalChain");
    if (captured_.salt1 != hdr->salt1 || captured_.salt2 != hdr->salt2) {
        captured_ = WalPosition{hdr->salt1, hdr->salt2, 0, hdr->cksum1, hdr->cksum2};
        page_size_ = page_size;
    }
    // This transaction's frames before the commit frame (from the tee, or
    // the file when the tee lacks them), then the commit frame from memory.
    const uint64_t from = captured_.frame + 1;
    std::vector<TeeFrame> frames;
    if (frame > from && !tee_.take(hdr->salt1, hdr->salt2, from, frame - 1, frames)) {
        frames.clear();
        if (!wal.read(page_size, from, frame - 1, frames))
            return make_error(ErrorKind::Corrupt, "WAL frames before " + std::to_string(frame) + " are missing",
                              "WalShort");
        wal_frames_read_.fetch_add(frame - from);
    }
    TeeFrame commit;
    std::memcpy(commit.header, frame_header, kWalFrameHeaderSize);
    commit.page.assign(reinterpret_cast<const char*>(page), page_size);
    frames.push_back(std::move(commit));
    std::vector<PendingTxn> txn;
    WalPosition pos = captured_;
    if (Status st = frames_to_txns(*hdr, from, frames, pos, txn, now_us(), 0); !st) {
        request_snapshot("sync commit: WAL checksum chain broken");
        return st;
    }
    uint64_t idx;
    {
        std::lock_guard olock(obs_mu_);
        idx = noted_index_.load() + 1;
        noted_index_.store(idx);
    }
    // An earlier commit not yet observed (should not happen in sync mode)
    // stays its own transaction, completing the previous observation.
    for (auto& x : txn) x.commit_index = idx - 1;
    txn.back().commit_index = idx;
    WalPosition before = captured_;
    for (auto& x : txn) {
        pending_bytes_ += x.bytes;
        pending_.push_back(std::move(x));
    }
    captured_ = pending_.back().end;
    if (pending_.size() == 1 && !inflight_) first_pending_time_ = Clock::now();

    auto st = upload_pending(lock, true, deadline);
    if (st && durable_index_.load() >= idx) {
        // The write-lock release will report this same commit: make it a no-op.
        std::lock_guard olock(obs_mu_);
        last_noted_salt1_ = hdr->salt1;
        last_noted_salt2_ = hdr->salt2;
        last_noted_frame_ = frame;
    }
    if (!st || durable_index_.load() < idx) {
        // The transaction will not commit locally; whether S3 kept it is
        // unknown, so this generation must not be appended to again.
        Error e = st.ok() ? make_error(ErrorKind::Transport, "not durable in time", "Timeout") : st.error();
        e.message = "sync commit refused: the transaction could not be made durable in S3 within " +
                    std::to_string(config_.sync_timeout.count()) + " ms: " + e.message;
        record_error(e);
        captured_ = before;
        pending_.clear();
        pending_bytes_ = 0;
        inflight_.reset();
        request_snapshot("a sync commit failed");
        retry_after_ = {};
        return e;
    }
    return {};
}

Result<WalPosition> Replicator::flush(std::chrono::milliseconds timeout) {
    if (!enabled_) return make_error(ErrorKind::InvalidArgument, "replication is off for this database (skip)", "Disabled");
    const uint64_t target = noted_index_.load();
    {
        std::lock_guard lock(cv_mu_);
        wake_ = true;
        force_ = true;
    }
    cv_.notify_all();
    auto deadline = Clock::now() + timeout;
    for (;;) {
        bool snap_pending;
        {
            // A first snapshot still owed for a non-empty database counts as unshipped.
            std::lock_guard ulock(upload_mu_);
            struct stat st{};
            snap_pending = (need_snapshot_ || broken_outside_wal_.load() || foreign_writer_.load()) &&
                           ::stat(path_.c_str(), &st) == 0 && st.st_size > 0;
        }
        if (durable_index_.load() >= target && !snap_pending) break;
        if (Clock::now() >= deadline) {
            std::lock_guard slock(status_mu_);
            return make_error(ErrorKind::Transport,
                              "flush timed out after " + std::to_string(timeout.count()) + " ms" +
                                  (last_error_.empty() ? "" : "; last error: " + last_error_),
                              "Timeout");
        }
        std::unique_lock lock(cv_mu_);
        wake_ = true;
        force_ = true;
        cv_.notify_all();
        durable_cv_.wait_for(lock, std::chrono::milliseconds(50));
    }
    std::lock_guard slock(status_mu_);
    return status_durable_;
}

Result<std::string> Replicator::snapshot_now() {
    if (!enabled_) return make_error(ErrorKind::InvalidArgument, "replication is off for this database (skip)", "Disabled");
    std::lock_guard net(net_mu_);
    Lock lock(upload_mu_);
    request_snapshot("requested by bottomless_snapshot()");
    // A read torn by a WAL restart that began just before the snapshot (or
    // a checkpoint in another process) is detected and read again; a few
    // attempts, then the error. (Snapshots read under a pinned read mark,
    // issue 9, will make this loop unnecessary.)
    Status st;
    for (int attempt = 0; attempt < 5; ++attempt) {
        retry_after_ = {};
        st = step(lock, true);
        if (st || st.error().code != "SnapshotTorn") break;
    }
    if (!st) return std::move(st).error();
    if (need_snapshot_) return make_error(ErrorKind::InvalidArgument, "the database is empty: nothing to snapshot", "Empty");
    return generation_;
}

std::string Replicator::status_json() const {
    nlohmann::json j;
    j["database"] = path_;
    j["database_id"] = config_.db_id;
    j["bucket"] = config_.bucket;
    j["endpoint"] = config_.s3.endpoint.empty() ? "aws" : log::redact_url(config_.s3.endpoint);
    j["mode"] = !enabled_ ? "off" : (config_.sync ? "sync" : "async");
    j["role"] = "leader";
    j["leader_pid"] = leader_lock_ ? leader_lock_->leader_pid() : 0;
    // The key id names the key without revealing it; the key never appears here.
    j["encryption"] = cipher_ ? nlohmann::json{{"alg", kEncryptionAlg}, {"key_id", cipher_->key_id()}}
                              : nlohmann::json(nullptr);
    std::lock_guard lock(status_mu_);
    j["generation"] = status_generation_;
    j["segment"] = status_seq_;
    j["durable_position"] = {{"salt1", status_durable_.salt1}, {"salt2", status_durable_.salt2},
                             {"frame", status_durable_.frame}};
    j["last_durable_commit"] = fmt_time_us(last_durable_commit_us_);
    j["last_durable_commit_us"] = last_durable_commit_us_;
    uint64_t noted = noted_index_.load(), durable = durable_index_.load();
    j["pending_transactions"] = noted > durable ? noted - durable : 0;
    j["pending_bytes"] = unshipped_bytes_.load();
    // Where unshipped frames wait: "memory" (they may leave the WAL, which
    // restarts as usual), "wal" (past max_pending_bytes: the WAL keeps them
    // and grows), "none".
    j["pending_in"] = noted <= durable ? "none"
                      : unshipped_bytes_.load() > config_.max_pending_bytes ? "wal"
                                                                              : "memory";
    j["wal_bytes"] = wal_bytes_.load();
    // Frames kept as they were written (tee.h), and frames the uploader had
    // to read back from the WAL because the tee lacked them.
    j["tee_bytes"] = tee_.bytes();
    j["wal_frames_read"] = wal_frames_read_.load();
    j["wal_budget"] = {{"max_wal_bytes", config_.max_wal_bytes},
                       {"policy", config_.wal_budget_fail ? "fail" : "warn"},
                       {"exceeded", wal_over_budget_.load()}};
    int64_t lag_ms = 0;
    int64_t oldest = oldest_unshipped_us_.load();
    if (noted > durable && oldest > 0) lag_ms = std::max<int64_t>(0, (now_us() - oldest) / 1000);
    j["lag_ms"] = lag_ms;
    j["segments_uploaded"] = segments_uploaded_;
    j["snapshots_uploaded"] = snapshots_uploaded_;
    j["bytes_uploaded"] = bytes_uploaded_;
    j["segment_bytes_uploaded"] = segment_bytes_uploaded_;
    j["wal_bytes_shipped"] = wal_bytes_shipped_;
    auto cs = client_->stats();
    j["requests"] = cs.requests;
    j["put_requests"] = cs.puts;
    j["retries"] = cs.retries;
    j["last_error"] = last_error_.empty() ? nlohmann::json(nullptr) : nlohmann::json(last_error_);
    if (!last_error_.empty()) j["last_error_at"] = fmt_time_us(last_error_us_);
    return j.dump();
}

void Replicator::for_each(const std::function<void(const Replicator&)>& fn) {
    std::vector<std::shared_ptr<Replicator>> running;
    {
        std::lock_guard lock(registry_mu());
        for (auto& [path, entry] : registry())
            if (auto r = entry.replicator.lock()) running.push_back(std::move(r));
    }
    // Outside the lock: the last reference may go here, and a destructor
    // takes the registry's lock.
    for (const auto& r : running) fn(*r);
}

ReplicatorMetrics Replicator::metrics() const {
    ReplicatorMetrics m;
    m.database = path_;
    m.database_id = config_.db_id;
    m.bucket = config_.bucket;
    m.mode = !enabled_ ? "off" : (config_.sync ? "sync" : "async");
    uint64_t noted = noted_index_.load(), durable = durable_index_.load();
    m.commits_observed = noted;
    m.commits_durable = durable;
    m.pending_transactions = noted > durable ? noted - durable : 0;
    m.pending_bytes = unshipped_bytes_.load();
    int64_t oldest = oldest_unshipped_us_.load();
    if (noted > durable && oldest > 0) m.lag_seconds = std::max<int64_t>(0, now_us() - oldest) / 1e6;
    m.wal_bytes = wal_bytes_.load();
    m.wal_budget_exceeded = wal_over_budget_.load();
    if (client_) m.s3 = client_->stats();
    std::lock_guard lock(status_mu_);
    m.generation = status_generation_;
    m.segment = status_seq_;
    m.last_durable_commit_us = last_durable_commit_us_;
    m.segments_uploaded = segments_uploaded_;
    m.snapshots_uploaded = snapshots_uploaded_;
    m.bytes_uploaded = bytes_uploaded_;
    m.wal_bytes_shipped = wal_bytes_shipped_;
    m.errors = errors_;
    return m;
}

bool Replicator::write_state_file(bool clean_close) {
    if (generation_.empty() && lineage_.empty()) return true;
    LocalState st;
    st.bucket = config_.bucket;
    st.db_id = config_.db_id;
    st.generation = generation_;
    st.seq = seq_;
    st.prev_sha256 = prev_sha256_;
    st.position = durable_;
    st.lineage = lineage_;
    st.key_id = cipher_ ? cipher_->key_id() : std::string();
    st.kdf = kdf_text_;
    st.restarted = restarted_;
    struct stat db{}, wal{};
    bool fully_shipped = durable_index_.load() >= noted_index_.load() && pending_.empty() && !inflight_;
    if (clean_close && fully_shipped && stat_file(path_, db) && !stat_file(wal_path_, wal)) {
        st.clean_close = true;
        st.db_size = static_cast<int64_t>(db.st_size);
        st.db_mtime_ns = mtime_ns(db);
        st.db_ino = static_cast<uint64_t>(db.st_ino);
    }
    // Not fsynced on purpose: a stale state file only makes the next start
    // unable to prove continuity, which costs a new generation, never data.
    if (Status w = replicator::write_state_file(state_path_, st); !w) {
        log::warn(w.error().message);
        return false;
    }
    return true;
}

}  // namespace bottomless::replicator
