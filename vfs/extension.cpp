// Entry points of bottomless as a loadable extension (bottomless.so) and as a
// static library (libbottomless.a), and the SQL functions:
//
//   bottomless_status()            JSON: generation, mode, durable position, lag, counters, last error
//   bottomless_status('*')         JSON: the process: databases open, uploader pool, pending, requests, errors
//   bottomless_flush([timeout_ms]) waits until everything committed so far is durable; JSON position
//   bottomless_snapshot()          starts a new generation now; returns its id
//   bottomless_metrics()           Prometheus text (0.0.4) for every replicated database of the process
//
// LOADING: `.load ./bottomless` registers the VFS (not as the default unless
// LIBSQL_BOTTOMLESS_DEFAULT_VFS=1) and, through sqlite3_auto_extension, the
// SQL functions on every connection opened afterwards.
#include "replicator/sqlite_api.h"

#ifdef BOTTOMLESS_LOADABLE_EXTENSION
// The one definition of the host's API table in this module.
const sqlite3_api_routines* sqlite3_api = nullptr;
#endif

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>

#include <nlohmann/json.hpp>

#include "bottomless.h"
#include "replicator/follower.h"
#include "replicator/metrics.h"
#include "replicator/replicator.h"
#include "vfs/vfs.h"

namespace {

using bottomless::replicator::Replicator;

sqlite3_file* main_file(sqlite3_context* ctx) {
    sqlite3* db = sqlite3_context_db_handle(ctx);
    sqlite3_file* file = nullptr;
    if (sqlite3_file_control(db, "main", SQLITE_FCNTL_FILE_POINTER, &file) != SQLITE_OK) return nullptr;
    return file;
}

std::string follower_message(long leader) {
    return "bottomless: " + (leader > 0 ? "process " + std::to_string(leader) : std::string("another process")) +
           " replicates this database; this connection is read-only and does not replicate";
}

Replicator* connection_replicator(sqlite3_context* ctx) {
    sqlite3_file* file = main_file(ctx);
    if (!file || !bottomless::vfs::is_bottomless_file(file)) {
        sqlite3_result_error(ctx, "bottomless: this database was not opened with vfs=bottomless", -1);
        return nullptr;
    }
    Replicator* r = bottomless::vfs::replicator_of(file);
    if (!bottomless::vfs::replica_status(file).empty()) {
        sqlite3_result_error(ctx, "bottomless: this connection is a read replica (replica=1): it follows the bucket and does not replicate", -1);
        return nullptr;
    }
    if (auto* fo = bottomless::vfs::follower_of(file); fo && fo->promoted()) {
        // This process took over: the connection's replicator is the new one.
        return fo->promoted().get();
    }
    if (long leader = bottomless::vfs::leader_elsewhere(file)) {
        std::string m = follower_message(leader);
        sqlite3_result_error(ctx, m.c_str(), -1);
    } else if (!r) {
        sqlite3_result_error(ctx, "bottomless: replication is off for this database (initial_replication=skip)", -1);
    }
    return r;
}

void fn_status(sqlite3_context* ctx, int argc, sqlite3_value** argv) {
    try {
        if (argc > 0) {
            // bottomless_status('*'): the whole process, on any connection.
            const unsigned char* what = sqlite3_value_text(argv[0]);
            if (!what || std::strcmp(reinterpret_cast<const char*>(what), "*") != 0) {
                sqlite3_result_error(ctx, "bottomless_status: the only argument it takes is '*' (every database of the process)", -1);
                return;
            }
            std::string s = Replicator::process_status_json();
            sqlite3_result_text(ctx, s.c_str(), static_cast<int>(s.size()), SQLITE_TRANSIENT);
            return;
        }
        // A follower connection answers with who leads instead of an error:
        // status is how an operator finds out.
        if (sqlite3_file* file = main_file(ctx)) {
            if (std::string s = bottomless::vfs::replica_status(file); !s.empty()) {
                sqlite3_result_text(ctx, s.c_str(), static_cast<int>(s.size()), SQLITE_TRANSIENT);
                return;
            }
            if (auto* fo = bottomless::vfs::follower_of(file)) {
                std::string s = fo->status_json();
                sqlite3_result_text(ctx, s.c_str(), static_cast<int>(s.size()), SQLITE_TRANSIENT);
                return;
            }
            if (long leader = bottomless::vfs::leader_elsewhere(file)) {
                std::string s = nlohmann::json{{"role", "follower"},
                                               {"leader_pid", leader > 0 ? nlohmann::json(leader) : nlohmann::json()},
                                               {"read_only", true},
                                               {"message", follower_message(leader)}}
                                    .dump();
                sqlite3_result_text(ctx, s.c_str(), static_cast<int>(s.size()), SQLITE_TRANSIENT);
                return;
            }
        }
        if (Replicator* r = connection_replicator(ctx)) {
            std::string s = r->status_json();
            sqlite3_result_text(ctx, s.c_str(), static_cast<int>(s.size()), SQLITE_TRANSIENT);
        }
    } catch (const std::exception& e) {
        sqlite3_result_error(ctx, e.what(), -1);
    }
}

void fn_flush(sqlite3_context* ctx, int argc, sqlite3_value** argv) {
    try {
        int64_t ms = argc > 0 ? sqlite3_value_int64(argv[0]) : 60'000;
        const std::chrono::milliseconds timeout(ms > 0 ? ms : 60'000);
        // A follower: until the leader has every commit visible now (in any
        // process), or this process took over and shipped it.
        sqlite3_file* file = main_file(ctx);
        auto* fo = file ? bottomless::vfs::follower_of(file) : nullptr;
        const bool follows = fo && !fo->promoted();
        Replicator* r = follows ? nullptr : connection_replicator(ctx);
        if (!follows && !r) return;
        auto pos = follows ? fo->flush(timeout) : r->flush(timeout);
        if (!pos) {
            std::string m = "bottomless_flush: " + pos.error().message;
            sqlite3_result_error(ctx, m.c_str(), -1);
            return;
        }
        nlohmann::json out;
        if (follows) {
            out = {{"leader_pid", fo->leader_pid()}, {"frame", pos->frame}};
        } else {
            nlohmann::json j = nlohmann::json::parse(r->status_json());
            out = {{"generation", j["generation"]},
                   {"segment", j["segment"]},
                   {"frame", pos->frame},
                   {"last_durable_commit", j["last_durable_commit"]}};
        }
        std::string s = out.dump();
        sqlite3_result_text(ctx, s.c_str(), static_cast<int>(s.size()), SQLITE_TRANSIENT);
    } catch (const std::exception& e) {
        sqlite3_result_error(ctx, e.what(), -1);
    }
}

void fn_snapshot(sqlite3_context* ctx, int, sqlite3_value**) {
    try {
        Replicator* r = connection_replicator(ctx);
        if (!r) return;
        auto gen = r->snapshot_now();
        if (!gen) {
            std::string m = "bottomless_snapshot: " + gen.error().message;
            sqlite3_result_error(ctx, m.c_str(), -1);
            return;
        }
        sqlite3_result_text(ctx, gen->c_str(), static_cast<int>(gen->size()), SQLITE_TRANSIENT);
    } catch (const std::exception& e) {
        sqlite3_result_error(ctx, e.what(), -1);
    }
}

// Process-wide: callable on any connection (a bottomless one or not), so an
// application can serve it on /metrics from whatever database it has open.
void fn_metrics(sqlite3_context* ctx, int, sqlite3_value**) {
    try {
        std::string s = bottomless::replicator::metrics_text();
        sqlite3_result_text(ctx, s.c_str(), static_cast<int>(s.size()), SQLITE_TRANSIENT);
    } catch (const std::bad_alloc&) {
        sqlite3_result_error_nomem(ctx);
    } catch (const std::exception& e) {
        sqlite3_result_error(ctx, e.what(), -1);
    }
}

int register_functions(sqlite3* db) {
    // SQLITE_DIRECTONLY: these functions have side effects (uploads, a new
    // generation) or reveal replication state, so only SQL the application
    // runs itself may call them, never a view or trigger planted in the
    // database file (SQLite's "unsafe use of ..." error).
    constexpr int kFlags = SQLITE_UTF8 | SQLITE_DIRECTONLY;
    struct Fn {
        const char* name;
        int args;
        void (*fn)(sqlite3_context*, int, sqlite3_value**);
    };
    static constexpr Fn kFunctions[] = {
        {"bottomless_status", 0, fn_status},
        {"bottomless_status", 1, fn_status},
        {"bottomless_flush", 0, fn_flush},
        {"bottomless_flush", 1, fn_flush},
        {"bottomless_snapshot", 0, fn_snapshot},
        {"bottomless_metrics", 0, fn_metrics},
    };
    for (const Fn& f : kFunctions)
        if (int rc = sqlite3_create_function(db, f.name, f.args, kFlags, nullptr, f.fn, nullptr, nullptr); rc != SQLITE_OK)
            return rc;
    return SQLITE_OK;
}

bool default_requested() {
    const char* v = std::getenv("LIBSQL_BOTTOMLESS_DEFAULT_VFS");
    return v && (std::strcmp(v, "1") == 0 || std::strcmp(v, "true") == 0);
}

// Runs for every connection opened after the extension loaded.
int per_connection(sqlite3* db, char** pzErrMsg, const sqlite3_api_routines* pApi) {
    (void)pzErrMsg;
    (void)pApi;
    return register_functions(db);
}

}  // namespace

extern "C" {

int bottomless_register(int make_default) {
    int rc = bottomless::vfs::register_vfs(make_default != 0 || default_requested());
    if (rc == SQLITE_OK) rc = sqlite3_auto_extension(reinterpret_cast<void (*)(void)>(per_connection));
    return rc;
}

int bottomless_auto_extension(sqlite3* db, char** pzErrMsg, const sqlite3_api_routines* pApi) {
    (void)pzErrMsg;
    (void)pApi;
    int rc = bottomless::vfs::register_vfs(default_requested());
    if (rc == SQLITE_OK && db) rc = register_functions(db);
    return rc;
}

const char* bottomless_version(void) { return BOTTOMLESS_VERSION; }

#ifdef BOTTOMLESS_LOADABLE_EXTENSION
__attribute__((visibility("default"))) int sqlite3_bottomless_init(sqlite3* db, char** pzErrMsg,
                                                                   const sqlite3_api_routines* pApi) {
    sqlite3_api = pApi;
    int rc = bottomless::vfs::register_vfs(default_requested());
    if (rc == SQLITE_OK) rc = register_functions(db);
    if (rc == SQLITE_OK) rc = sqlite3_auto_extension(reinterpret_cast<void (*)(void)>(per_connection));
    if (rc != SQLITE_OK) {
        if (pzErrMsg) *pzErrMsg = sqlite3_mprintf("bottomless: cannot register the VFS (error %d)", rc);
        return rc;
    }
    return SQLITE_OK_LOAD_PERMANENTLY;
}
#endif

}  // extern "C"
