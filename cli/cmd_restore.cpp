// bottomless-cli restore: rebuilds a database file from the bucket — the
// latest state, a generation, or the state at a point in time (every
// transaction committed at or before it, none after).
//
// The work is replicator::restore_database (temp file, checksums, chain,
// integrity_check, fsync, rename); this file decides whether to restore at
// all (--if-db-not-exists, --if-replica-exists, --force), which generation
// serves (history.h), and reports the result.
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <mutex>
#include <set>
#include <thread>

#include <nlohmann/json.hpp>

#include "cli/common.h"
#include "cli/history.h"
#include "cli/restore_common.h"
#include "replicator/replica.h"
#include "replicator/restore.h"
#include "s3/log.h"

namespace bottomless::cli {
namespace {

using json = nlohmann::json;

bool nonempty_file(const std::string& path, uint64_t* size = nullptr) {
    struct stat st{};
    if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return false;
    if (size) *size = static_cast<uint64_t>(st.st_size);
    return st.st_size > 0;
}

bool is_directory(const std::string& path) {
    struct stat st{};
    return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::string base_name(const std::string& path) {
    std::string p = path;
    while (p.size() > 1 && p.back() == '/') p.pop_back();
    return p.substr(p.find_last_of('/') + 1);
}

std::string dir_name(const std::string& path) {
    auto slash = path.find_last_of('/');
    if (slash == std::string::npos) return ".";
    return slash == 0 ? "/" : path.substr(0, slash);
}

// ---- several databases at once: restore ID ID ... / restore --all ----
//
// One Context, so one S3 client and one connection pool for all of them;
// up to --concurrent databases restore at once, each with --parallel /
// --concurrent GETs in flight, so the total stays at --parallel whatever
// the number of databases. Each database is decided and reported on its
// own (the same local checks and flags as a single restore); one failing
// does not stop the others.

struct Outcome {
    enum Kind { Restored, Skipped, Nothing, Failed };
    std::string id, output;
    Kind kind = Failed;
    std::string reason;  // Skipped, Nothing, Failed: why
    int code = kExitOk;
    replicator::RestoreResult result;
};

struct ManyFlags {
    bool if_db_missing = false, if_replica = false, force = false, all = false, json = false;
};

// The local checks, the choice and the restore of one database of several.
// Errors are printed (under print_mu) as they happen, prefixed by the id.
Outcome restore_one(Context& ctx, const std::string& id, const std::string& output, const RestoreRequest& req,
                    const ManyFlags& flags, std::mutex& print_mu) {
    Outcome o;
    o.id = id;
    o.output = output;
    auto fail = [&](const Error& e) {
        std::lock_guard lock(print_mu);
        o.code = ctx.fail(e, id);
        o.kind = o.code == kExitNothing ? Outcome::Nothing : Outcome::Failed;
        o.reason = e.message;
        return o;
    };
    uint64_t size = 0, wal_size = 0;
    const bool exists = nonempty_file(output, &size);
    const bool wal_exists = nonempty_file(output + "-wal", &wal_size);
    if (exists || wal_exists) {
        if (flags.if_db_missing) {
            o.kind = Outcome::Skipped;
            o.reason = "database exists (--if-db-not-exists)";
            return o;
        }
        if (!flags.force && !(req.incremental && exists))
            return fail(make_error(ErrorKind::Precondition,
                                   output + (exists ? " exists (" + format_bytes(size) + ")"
                                                    : "-wal exists (" + format_bytes(wal_size) + ")") +
                                       ": refusing to overwrite a database; pass --force to replace it, "
                                       "--if-db-not-exists to keep it",
                                   "Exists"));
    }
    std::vector<GenerationView> history;
    auto chosen = plan_restore(ctx, id, req, &history);
    if (!chosen) {
        const Error& e = chosen.error();
        // --all: a prefix of the bucket without a complete generation is not
        // a database this tool can restore, not a failure.
        if ((flags.if_replica || flags.all) && (e.code == "NoSuchBucket" || e.code == "NoReplica")) {
            o.kind = Outcome::Skipped;
            o.reason = e.message + (flags.all ? "" : " (--if-replica-exists)");
            return o;
        }
        return fail(e);
    }
    auto r = run_restore_into(ctx, id, *chosen, req, output, "restoring " + id, &history);
    if (!r) return fail(r.error());
    o.kind = Outcome::Restored;
    o.result = std::move(r).value();
    return o;
}

int run_restore_many(Context& ctx, const Args& args, RestoreRequest req, const ManyFlags& flags) {
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<std::string> ids;
    std::set<std::string> seen;
    for (const auto& d : args.positional()) {
        if (auto st = replicator::validate_db_id(d); !st) throw UsageError{st.error().message};
        if (seen.insert(d).second) ids.push_back(d);
    }
    std::string dir = args.get("output", ".");
    if (!is_directory(dir))
        return ctx.fail("directory " + dir + " does not exist",
                        "with several databases -o names a directory (one file per database id in it): create it");
    if (dir.size() > 1 && dir.back() == '/') dir.pop_back();
    if (!ctx.connect()) return kExitFailure;

    std::vector<Outcome> outcomes;
    if (flags.all) {
        auto dbs = replicator::list_databases(ctx.client(), ctx.bucket());
        if (!dbs) return ctx.fail(dbs.error());
        for (const auto& d : *dbs) {
            // Names from the bucket become file names: only a valid id
            // (letters, digits, '.', '_', '-'; never '.' or '..') may.
            if (auto st = replicator::validate_db_id(d); !st) {
                Outcome o;
                o.kind = Outcome::Skipped;
                o.id = log::printable(d, 200);  // a name from the server
                o.reason = "not a valid database id, so not a file name to restore to: " + st.error().message;
                ctx.warn("skipped '" + o.id + "': " + o.reason);
                outcomes.push_back(std::move(o));
                continue;
            }
            ids.push_back(d);
        }
        if (ids.empty() && outcomes.empty()) {
            ctx.note("bottomless-cli restore: bucket '" + ctx.bucket() + "' holds no database; nothing restored");
        }
    }

    const int total = req.parallel;
    const int at_once = static_cast<int>(std::clamp<int64_t>(
        args.has("concurrent") ? parse_int_option(args, "concurrent", 1, 16, 4) : std::min(4, total), 1,
        std::max<size_t>(1, ids.size())));
    req.parallel = std::max(1, total / at_once);
    req.progress = false;

    std::mutex print_mu;  // stdout/stderr lines and `outcomes`
    std::atomic<size_t> next{0};
    const size_t first = outcomes.size();
    outcomes.resize(first + ids.size());
    auto worker = [&] {
        for (size_t i; (i = next.fetch_add(1)) < ids.size();) {
            const std::string& id = ids[i];
            Outcome o = restore_one(ctx, id, dir + "/" + id, req, flags, print_mu);
            std::lock_guard lock(print_mu);
            if (!flags.json && !ctx.quiet()) {
                if (o.kind == Outcome::Restored) {
                    const auto& r = o.result;
                    std::printf("restored %s to %s: generation %s, segment %llu, %s, %s downloaded in %.2f s%s\n",
                                id.c_str(), o.output.c_str(), r.generation.c_str(),
                                static_cast<unsigned long long>(r.seq),
                                format_bytes(static_cast<uint64_t>(r.db_pages) * r.page_size).c_str(),
                                format_bytes(r.bytes_downloaded).c_str(), r.seconds,
                                r.incremental.empty() ? "" : (" (incremental: " + r.incremental + ")").c_str());
                } else if (o.kind == Outcome::Skipped) {
                    std::printf("skipped %s: %s\n", id.c_str(), o.reason.c_str());
                }
                std::fflush(stdout);
            }
            outcomes[first + i] = std::move(o);
        }
    };
    std::vector<std::thread> threads;
    for (int t = 0; t < at_once; ++t) threads.emplace_back(worker);
    for (auto& t : threads) t.join();

    size_t restored = 0, skipped = 0, nothing = 0, failed = 0;
    for (const auto& o : outcomes) {
        restored += o.kind == Outcome::Restored;
        skipped += o.kind == Outcome::Skipped;
        nothing += o.kind == Outcome::Nothing;
        failed += o.kind == Outcome::Failed;
    }
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (flags.json) {
        json list = json::array();
        for (const auto& o : outcomes) {
            json j = {{"database", o.id},
                      {"output", o.output},
                      {"restored", o.kind == Outcome::Restored},
                      {"outcome", o.kind == Outcome::Restored  ? "restored"
                                  : o.kind == Outcome::Skipped ? "skipped"
                                  : o.kind == Outcome::Nothing ? "nothing"
                                                               : "failed"}};
            if (o.kind == Outcome::Restored) {
                const auto& r = o.result;
                j["generation"] = r.generation;
                j["segment"] = r.seq;
                j["pages"] = r.db_pages;
                j["page_size"] = r.page_size;
                j["downloaded_bytes"] = r.bytes_downloaded;
                j["seconds"] = r.seconds;
                if (!r.incremental.empty()) j["incremental"] = r.incremental;
            } else {
                j[o.kind == Outcome::Skipped ? "reason" : "error"] = o.reason;
            }
            list.push_back(std::move(j));
        }
        std::printf("%s\n", json{{"databases", list},
                                 {"restored", restored},
                                 {"skipped", skipped},
                                 {"nothing", nothing},
                                 {"failed", failed},
                                 {"concurrent", at_once},
                                 {"parallel_each", req.parallel},
                                 {"seconds", secs}}
                                .dump(2)
                                .c_str());
    } else if (!ctx.quiet()) {
        std::printf("restored %zu of %zu database(s) into %s in %.2f s", restored, outcomes.size(), dir.c_str(), secs);
        if (failed) std::printf(", %zu failed", failed);
        if (nothing) std::printf(", %zu with nothing to restore", nothing);
        if (skipped) std::printf(", %zu skipped", skipped);
        std::printf(" (%d at once, %d GETs each)\n", at_once, req.parallel);
    }
    if (failed) return kExitFailure;
    if (nothing) return kExitNothing;
    return kExitOk;
}

// ---- restore --follow: keep the restored file current ----
//
// The file is a read replica (replicator/replica.h, docs/SEMANTICS.md "Read
// replicas"): hydrated from the bucket, then every new segment applied as
// it appears, as a rollback-mode writer with a real journal, so SQLite
// readers in other processes (sqlite3 -readonly, an application) always see
// a committed state. The same code as the VFS's replica=1: a file followed
// by an application is read here and taken over when the application
// closes it, and the reverse.

volatile sig_atomic_t g_follow_stop = 0;

void on_follow_signal(int) { g_follow_stop = 1; }

int run_restore_follow(Context& ctx, const Args& args, const std::string& db, const std::string& output) {
    for (const char* flag : {"generation", "utc-time", "incremental", "incremental-via", "if-db-not-exists",
                             "integrity-check"})
        if (args.has(flag))
            throw UsageError{std::string("--follow keeps the file at the newest state: --") + flag + " does not apply"};
    const int64_t poll_ms = parse_int_option(args, "poll-ms", 50, 3'600'000, 1000);
    const bool json_out = args.has("json");

    // A file that is not a replica this tool (or replica=1) keeps is a
    // database someone may need: replaced only with --force.
    uint64_t size = 0;
    const bool exists = nonempty_file(output, &size);
    struct stat st{};
    const bool is_replica = ::stat((output + "-bottomless-replica").c_str(), &st) == 0;
    if (nonempty_file(output + "-wal"))
        return ctx.fail(output + "-wal exists: " + output + " is a database in WAL mode, not a replica",
                        "pass -o another path (a replica is kept without a WAL)");
    if (exists && !is_replica && !args.has("force"))
        return ctx.fail(output + " exists (" + format_bytes(size) + ") and is not a replica kept by --follow",
                        "pass --force to replace it, or -o another path");

    replicator::ReplicatorConfig cfg = ctx.config();
    cfg.bucket = ctx.bucket();
    cfg.db_id = db;
    cfg.replica = true;
    cfg.replica_poll = std::chrono::milliseconds(poll_ms);
    if (sqlite3_initialize() != SQLITE_OK) return ctx.fail("cannot initialise SQLite");
    sqlite3_vfs* lower = sqlite3_vfs_find(nullptr);
    if (!lower) return ctx.fail("SQLite has no default VFS");

    auto replica = replicator::Replica::acquire(output, cfg, lower);
    if (!replica) return ctx.fail(replica.error());

    struct sigaction sa{}, old_int{}, old_term{}, old_hup{};
    sa.sa_handler = on_follow_signal;
    ::sigemptyset(&sa.sa_mask);
    ::sigaction(SIGINT, &sa, &old_int);
    ::sigaction(SIGTERM, &sa, &old_term);
    ::sigaction(SIGHUP, &sa, &old_hup);

    // One line per change of position, role or error (JSON lines with --json).
    std::string last_key;
    auto report = [&](bool final) {
        json j = json::parse((*replica)->status_json());
        const std::string key = j["role"].dump() + j["generation"].dump() + j["segment"].dump() +
                                j["last_error"].dump() + j["stalled"].dump();
        if (key == last_key && !final) return;
        last_key = key;
        if (ctx.quiet() && !json_out) return;
        if (json_out) {
            json line = {{"event", final ? "stopped" : "position"},
                         {"output", output},
                         {"database", db},
                         {"role", j["role"]},
                         {"generation", j["generation"]},
                         {"segment", j["segment"]},
                         {"last_txn", j["last_applied_commit"]},
                         {"last_txn_us", j["last_applied_commit_us"]},
                         {"segments_applied", j["segments_applied"]},
                         {"hydrations", j["hydrations"]},
                         {"stalled", j["stalled"]},
                         {"last_error", j["last_error"]}};
            std::printf("%s\n", line.dump().c_str());
        } else if (j["role"] == "reader") {
            std::printf("%s is followed by process %s: reading; this process takes over when it stops\n",
                        output.c_str(), j["follower_pid"].dump().c_str());
        } else {
            std::printf("%s %s at generation %s, segment %llu, last transaction %s%s%s\n",
                        final ? "stopped following;" : "following:", output.c_str(),
                        j["generation"].get<std::string>().c_str(),
                        static_cast<unsigned long long>(j["segment"].get<uint64_t>()),
                        j["last_applied_commit"].is_string() ? j["last_applied_commit"].get<std::string>().c_str() : "-",
                        j["stalled"].get<bool>() ? " (stalled)" : "",
                        j["last_error"].is_string() ? ("; " + j["last_error"].get<std::string>()).c_str() : "");
        }
        std::fflush(stdout);
    };
    report(false);
    while (!g_follow_stop) {
        ::usleep(100'000);
        report(false);
    }
    report(true);
    replica->reset();  // stops the follower thread (an apply under way completes or rolls back)
    ::sigaction(SIGINT, &old_int, nullptr);
    ::sigaction(SIGTERM, &old_term, nullptr);
    ::sigaction(SIGHUP, &old_hup, nullptr);
    return kExitOk;
}

int run_restore(Context& ctx, const Args& args) {
    ctx.set_quiet(args.has("quiet") || args.has("json"));
    RestoreRequest req = restore_request_from(args);
    if (!args.has("integrity-check")) req.integrity_check = replicator::kDefaultIntegrityCheck;
    const bool if_db_missing = args.has("if-db-not-exists");
    const bool if_replica = args.has("if-replica-exists");
    const bool force = args.has("force");
    req.incremental = args.has("incremental");
    req.full_if_refused = force;
    if (args.has("incremental-via")) {
        const std::string via = args.get("incremental-via");
        if (via != "wal" && via != "copy") throw UsageError{"--incremental-via '" + via + "': expected wal or copy"};
        req.incremental_copy = via == "copy";
    }
    if (req.incremental && if_db_missing)
        throw UsageError{"--incremental updates an existing copy, --if-db-not-exists keeps it: choose one"};

    if (args.has("poll-ms") && !args.has("follow")) throw UsageError{"--poll-ms is for --follow"};
    // Several databases: ids as arguments, or --all.
    if (args.has("all") || !args.positional().empty()) {
        if (args.has("all") && !args.positional().empty())
            throw UsageError{"--all restores every database in the bucket: give database ids or --all, not both"};
        if (args.has("database"))
            throw UsageError{"-d names one database: with database ids as arguments or --all, leave it out"};
        if (args.positional().size() > 1 || args.has("all")) {
            if (args.has("follow")) throw UsageError{"--follow keeps one database current: give one id"};
            ManyFlags flags;
            flags.if_db_missing = if_db_missing;
            flags.if_replica = if_replica;
            flags.force = force;
            flags.all = args.has("all");
            flags.json = args.has("json");
            return run_restore_many(ctx, args, req, flags);
        }
    } else if (args.has("concurrent")) {
        throw UsageError{"--concurrent is for several databases (ids as arguments, or --all)"};
    }

    // The output and, from its name, the database id (as the extension derives it).
    std::string output = args.get("output");
    if (!ctx.connect()) return kExitFailure;
    // One id as an argument is -d ID.
    auto db = args.positional().size() == 1
                  ? std::optional<std::string>(args.positional()[0])
                  : ctx.database_id(output.empty() || is_directory(output) ? std::string() : base_name(output));
    if (db && args.positional().size() == 1)
        if (auto st = replicator::validate_db_id(*db); !st) throw UsageError{st.error().message};
    if (!db) return kExitUsage;
    if (output.empty()) output = *db;
    else if (is_directory(output)) output = (output.back() == '/' ? output : output + "/") + *db;
    if (!is_directory(dir_name(output)))
        return ctx.fail("directory " + dir_name(output) + " does not exist", "create it or pass another -o PATH");
    if (args.has("follow")) return run_restore_follow(ctx, args, *db, output);

    // Local checks first: they need no network and must hold whatever the bucket says.
    uint64_t size = 0, wal_size = 0;
    bool exists = nonempty_file(output, &size);
    bool wal_exists = nonempty_file(output + "-wal", &wal_size);
    if (exists || wal_exists) {
        if (if_db_missing) {
            ctx.note("bottomless-cli restore: " + output + " exists; nothing restored (--if-db-not-exists)");
            if (args.has("json"))
                std::printf("%s\n", json{{"restored", false}, {"reason", "database exists"}, {"output", output}}
                                        .dump(2)
                                        .c_str());
            return kExitOk;
        }
        // --incremental decides on an existing file itself (its state note
        // must prove it an older copy); a WAL without its database does not.
        if (!force && !(req.incremental && exists))
            return ctx.fail(output + (exists ? " exists (" + format_bytes(size) + ")" : "-wal exists (" + format_bytes(wal_size) + ")") +
                                ": refusing to overwrite a database",
                            "pass --force to replace it, --if-db-not-exists to keep it, or -o another path");
    }

    std::vector<GenerationView> history;
    auto suggest_older = [&](const Error& e) {
        std::string older = older_than_damaged(history, e);
        if (!older.empty())
            std::fprintf(stderr, "  an older generation may still restore: bottomless-cli -b %s -d %s verify -g %s\n",
                         ctx.bucket().c_str(), db->c_str(), older.c_str());
    };
    auto chosen = plan_restore(ctx, *db, req, &history);
    if (!chosen) {
        const Error& e = chosen.error();
        if (if_replica && (e.code == "NoSuchBucket" || e.code == "NoReplica")) {
            ctx.note("bottomless-cli restore: " + e.message + "; nothing restored (--if-replica-exists)");
            if (args.has("json"))
                std::printf("%s\n", json{{"restored", false}, {"reason", "no replica"}, {"output", output}}
                                        .dump(2)
                                        .c_str());
            return kExitOk;
        }
        int code = ctx.fail(e);
        suggest_older(e);
        return code;
    }

    auto result = run_restore_into(ctx, *db, *chosen, req, output, "restoring " + *db, &history);
    if (!result) {
        int code = ctx.fail(result.error());
        suggest_older(result.error());
        std::fprintf(stderr, "  nothing was written at %s\n", output.c_str());
        return code;
    }
    const auto& r = *result;
    const uint64_t bytes = static_cast<uint64_t>(r.db_pages) * r.page_size;
    if (args.has("json")) {
        json j = {{"restored", true},
                  {"output", output},
                  {"database", *db},
                  {"bucket", ctx.bucket()},
                  {"generation", r.generation},
                  {"segment", r.seq},
                  {"transactions", r.transactions},
                  {"last_txn", r.last_commit_us ? json(format_time_us(r.last_commit_us)) : json(nullptr)},
                  {"last_txn_us", r.last_commit_us},
                  {"page_size", r.page_size},
                  {"pages", r.db_pages},
                  {"bytes", bytes},
                  {"downloaded_bytes", r.bytes_downloaded},
                  {"integrity_check", replicator::to_string(r.checked)},
                  {"seconds", r.seconds}};
        if (req.incremental) {
            j["incremental"] = r.incremental;
            if (!r.incremental_reason.empty()) j["incremental_reason"] = r.incremental_reason;
            if (r.incremental != "full") {
                j["from_segment"] = r.from_seq;
                j["applied_via"] = r.applied_via;
                j["copied_bytes"] = r.copied_bytes;
                j["copy_seconds"] = r.timings.copy;
            }
            if (r.incremental == "pages") {
                j["from_generation"] = r.from_generation;
                j["pages_compared"] = r.pages_compared;
                j["pages_changed"] = r.pages_changed;
                j["frames_fetched"] = r.frames_fetched;
                j["bridge_segments"] = r.bridge_segments;
                j["bridge_generations"] = r.bridge_generations;
                j["bridge_pages"] = r.bridge_pages;
                j["bridge_transactions"] = r.bridge_transactions;
                if (!r.bridge_fallback.empty()) j["bridge_fallback"] = r.bridge_fallback;
                j["compare_seconds"] = r.timings.compare;
                j["compared_with"] = r.compared_with;
            }
        }
        if (req.until_us) j["until"] = format_time_us(*req.until_us);
        std::printf("%s\n", j.dump(2).c_str());
    } else if (!ctx.quiet()) {
        std::printf("restored %s from s3://%s/%s to %s\n", db->c_str(), ctx.bucket().c_str(), db->c_str(),
                    output.c_str());
        std::printf("  generation        %s, snapshot + %llu segment(s), %llu transaction(s) from segments\n",
                    r.generation.c_str(), static_cast<unsigned long long>(r.seq),
                    static_cast<unsigned long long>(r.transactions));
        std::printf("  last transaction  %s%s\n", format_time_us(r.last_commit_us).c_str(),
                    req.until_us ? (" (asked: at or before " + format_time_us(*req.until_us) + ")").c_str() : "");
        std::printf("  size              %u pages x %u bytes = %s\n", r.db_pages, r.page_size,
                    format_bytes(bytes).c_str());
        double rate = r.seconds > 0 ? static_cast<double>(r.bytes_downloaded) / r.seconds : 0;
        const char* checks = r.checked == replicator::IntegrityCheck::Full    ? "checksums, chain and integrity_check ok"
                             : r.checked == replicator::IntegrityCheck::Quick ? "checksums, chain and quick_check ok"
                                                                              : "checksums and chain ok (no integrity check)";
        std::printf("  downloaded        %s in %.2f s (%s/s), %s\n", format_bytes(r.bytes_downloaded).c_str(), r.seconds,
                    format_bytes(static_cast<uint64_t>(rate)).c_str(), checks);
        if (r.incremental == "full")
            std::printf("  incremental       no, a full restore: %s\n", r.incremental_reason.c_str());
        else if (r.incremental == "up-to-date")
            std::printf("  incremental       the copy already was at segment %llu: nothing changed\n",
                        static_cast<unsigned long long>(r.seq));
        else if (r.incremental == "pages")
            std::printf("  incremental       from generation %s%s: %llu of %llu pages differed (%llu frames fetched), "
                        "then segments 1..%llu, applied %s\n",
                        r.from_generation.c_str(),
                        r.bridge_segments ? (" through " + std::to_string(r.bridge_segments) + " segment(s) of " +
                                             std::to_string(r.bridge_generations) + " generation(s) from its segment " +
                                             std::to_string(r.from_seq + 1) + " (" + std::to_string(r.bridge_pages) +
                                             " pages)")
                                                .c_str()
                                          : "",
                        static_cast<unsigned long long>(r.pages_changed),
                        static_cast<unsigned long long>(r.db_pages), static_cast<unsigned long long>(r.frames_fetched),
                        static_cast<unsigned long long>(r.seq),
                        r.applied_via == "wal" ? "through a WAL journal" : ("onto a " + r.applied_via).c_str());
        else if (r.incremental == "segments")
            std::printf("  incremental       segments %llu..%llu applied %s\n",
                        static_cast<unsigned long long>(r.from_seq + 1), static_cast<unsigned long long>(r.seq),
                        r.applied_via == "wal"
                            ? "through a WAL journal, checkpointed by SQLite"
                            : ("onto a " + std::string(r.applied_via == "clone" ? "clone" : "copy") + " of the file (" +
                               format_bytes(r.copied_bytes) + " in " + std::to_string(r.timings.copy) + " s)")
                                  .c_str());
        if (r.incremental == "pages" && !r.bridge_fallback.empty())
            std::printf("                    %s\n", r.bridge_fallback.c_str());
    }
    return kExitOk;
}

}  // namespace

const Command& restore_command() {
    static const Command kCmd = {
        "restore",
        "restore a database: the latest state, a generation, or a point in time",
        "restore [-o PATH] [-g GEN | --utc-time T] [--if-db-not-exists] [--if-replica-exists] [--force] "
        "[--incremental] [--integrity-check MODE]\n"
        "       bottomless-cli [GLOBAL OPTIONS] restore [-o PATH] --follow [--poll-ms N] [--force]\n"
        "       bottomless-cli [GLOBAL OPTIONS] restore [-o DIR] (ID ID ... | --all) [--concurrent N] [OPTIONS]",
        "Rebuilds the database from its snapshot and segments: every object's checksum\n"
        "and the chain between them are checked, whole transactions only are applied,\n"
        "the result goes to PATH.restore-tmp, is fsynced and renamed to PATH. On any\n"
        "failure nothing is written at PATH. Stale PATH-wal/-shm files are removed so\n"
        "SQLite cannot replay them onto the result.\n"
        "\n"
        "The objects' SHA-256 checksums and the chain prove the bytes are the ones the\n"
        "writer shipped. --integrity-check quick also runs PRAGMA quick_check on the\n"
        "result before the rename (every page and b-tree), full PRAGMA integrity_check\n"
        "(also every index against its table); each reads the whole file back (about\n"
        "0.5 s per GiB). Default none; verify always runs the full check.\n"
        "\n"
        "--utc-time T restores exactly the transactions committed at or before T:\n"
        "  2026-03-01T10:42:17Z, 2026-03-01T10:42:17.250+01:00, '2026-03-01 10:42:17'\n"
        "  (no offset: UTC), 2026-03-01 (midnight UTC). 'ls' prints the times it can reach.\n"
        "\n"
        "--incremental brings an older copy at PATH, restored earlier by this tool, up\n"
        "to date: only the segments after its position are downloaded, written as one\n"
        "transaction into a WAL renamed to PATH-wal and checkpointed by SQLite (or, with\n"
        "--incremental-via copy, into a duplicate of the file renamed over it); killed\n"
        "before that rename, the old copy stays as it was. Its note (PATH-bottomless) must\n"
        "prove it is: same bucket and database, unchanged since (size, mtime, inode,\n"
        "no WAL), part of this history. Else it is refused; with --force restored in\n"
        "full. Across a newer generation it restores in full (and says why).\n"
        "\n"
        "Without -d the database id is the output file's name (as the extension derives\n"
        "it from the database file's name).\n"
        "\n"
        "Several databases: give their ids as arguments, or --all (every database id\n"
        "the bucket holds); each is restored to DIR/ID (-o DIR, default the current\n"
        "directory) with the same options and checks as one. They share one S3\n"
        "connection pool: --concurrent of them at once (default 4), --parallel GETs in\n"
        "all. Each one's outcome is printed; one failing does not stop the others, and\n"
        "the exit status is 1 if any failed (3 if some had nothing to restore).\n"
        "\n"
        "--follow keeps PATH current until interrupted (SIGINT, SIGTERM or SIGHUP; exit\n"
        "0): restored first, then every new segment applied as it appears (polled\n"
        "every --poll-ms, default 1000), a new generation followed. PATH is a read\n"
        "replica, kept in rollback-journal format (no -wal): any SQLite reader can open\n"
        "it read-only meanwhile and always sees a committed state. PATH-bottomless-replica\n"
        "records the position, so --follow again continues without a new download. One\n"
        "line per change of position (JSON lines with --json).",
        {
            {'o', "output", "PATH", "where to write the database (default: ./<database id>; a directory: DIR/<id>)"},
            {'g', "generation", "GEN", "restore this generation (default: the newest that serves)"},
            {'t', "utc-time", "T", "restore the state at T (RFC 3339 or 'YYYY-MM-DD HH:MM:SS', UTC)"},
            {0, "if-db-not-exists", nullptr, "do nothing (exit 0) if PATH already holds a database"},
            {0, "if-replica-exists", nullptr, "do nothing (exit 0) if the bucket holds no replica of the database"},
            {'f', "force", nullptr, "replace an existing database at PATH (with --incremental: if refused)"},
            {0, "incremental", nullptr, "update the older restored copy at PATH: download only what changed"},
            {0, "incremental-via", "HOW", "wal (default: a WAL journal when the copy is in WAL mode) or copy (a duplicate file)"},
            {'j', "parallel", "N", "GETs in flight: snapshot parts and segments (default 4, 1..64); in all, with several databases"},
            {0, "all", nullptr, "restore every database in the bucket, each to DIR/ID"},
            {0, "concurrent", "N", "with several databases: how many restore at once (default min(4, --parallel), 1..16)"},
            {0, "integrity-check", "MODE", "none (default), quick or full: the SQLite check before the rename"},
            {0, "follow", nullptr, "keep PATH current (a read replica) until interrupted"},
            {0, "poll-ms", "N", "with --follow: how often to ask for the next segment (default 1000)"},
            {'q', "quiet", nullptr, "no progress bar and no report"},
            {0, "json", nullptr, "print the report as JSON"},
        },
        run_restore,
    };
    return kCmd;
}

}  // namespace bottomless::cli
