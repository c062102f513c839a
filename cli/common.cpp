// See common.h.
#include "cli/common.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <ctime>

#include "replicator/restore.h"
#include "replicator/util.h"
#include "s3/log.h"

namespace bottomless::cli {

// ---------------------------------------------------------------------------
// Command line

std::string Args::get(const std::string& name, const std::string& fallback) const {
    auto it = values_.find(name);
    return it == values_.end() || it->second.empty() ? fallback : it->second.back();
}

std::vector<std::string> Args::all(const std::string& name) const {
    auto it = values_.find(name);
    return it == values_.end() ? std::vector<std::string>{} : it->second;
}

const std::vector<OptionSpec>& global_options() {
    static const std::vector<OptionSpec> kGlobal = {
        {'e', "endpoint", "URL",
         "S3 endpoint (default: LIBSQL_BOTTOMLESS_ENDPOINT, AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, the AWS profile's "
         "endpoint_url, else AWS)"},
        {'b', "bucket", "NAME", "bucket (default: LIBSQL_BOTTOMLESS_BUCKET, else \"bottomless\")"},
        {'d', "database", "ID",
         "database id (default: LIBSQL_BOTTOMLESS_DATABASE_ID; for restore, the output file's name)"},
        {0, "encryption-key", "KEY",
         "the replica's 32-byte key, 64 hex digits or base64 (default: LIBSQL_BOTTOMLESS_ENCRYPTION_KEY; the "
         "environment keeps it out of the process list)"},
        {0, "encryption-passphrase", "TEXT", "the replica's passphrase (default: LIBSQL_BOTTOMLESS_ENCRYPTION_PASSPHRASE)"},
        {'h', "help", nullptr, "show help (for a command: bottomless-cli COMMAND --help)"},
        {0, "version", nullptr, "show the version"},
    };
    return kGlobal;
}

namespace {

const OptionSpec* find_long(const std::vector<const OptionSpec*>& all, std::string_view name) {
    for (const auto* o : all)
        if (name == o->long_name) return o;
    return nullptr;
}
const OptionSpec* find_short(const std::vector<const OptionSpec*>& all, char c) {
    for (const auto* o : all)
        if (o->short_name == c) return o;
    return nullptr;
}

}  // namespace

Args parse_args(const std::vector<std::string>& argv, const std::vector<OptionSpec>& spec, const char* command) {
    std::vector<const OptionSpec*> all;
    for (const auto& o : global_options()) all.push_back(&o);
    for (const auto& o : spec) all.push_back(&o);
    const std::string where = command ? std::string(" for '") + command + "'" : std::string();
    const std::string see = command ? std::string(" (see bottomless-cli ") + command + " --help)"
                                    : std::string(" (see bottomless-cli --help)");
    Args out;
    for (size_t i = 0; i < argv.size(); ++i) {
        const std::string& a = argv[i];
        if (a == "--") {
            for (++i; i < argv.size(); ++i) out.positional_.push_back(argv[i]);
            break;
        }
        if (a.size() < 2 || a[0] != '-') {
            out.positional_.push_back(a);
            continue;
        }
        const OptionSpec* o = nullptr;
        std::optional<std::string> inline_value;
        std::string shown = a;
        if (a[1] == '-') {
            std::string name = a.substr(2);
            if (auto eq = name.find('='); eq != std::string::npos) {
                inline_value = name.substr(eq + 1);
                name.resize(eq);
                shown = "--" + name;
            }
            o = find_long(all, name);
        } else {
            o = find_short(all, a[1]);
            shown = a.substr(0, 2);
            if (o && a.size() > 2) {
                if (!o->value_name) throw UsageError{"option " + shown + " takes no value" + see};
                inline_value = a.substr(2);  // -l5, -gGEN
            }
        }
        if (!o) throw UsageError{"unknown option " + shown + where + see};
        std::string value;
        if (o->value_name) {
            if (inline_value) {
                value = *inline_value;
            } else {
                if (i + 1 >= argv.size())
                    throw UsageError{"option " + shown + " needs a value (" + o->value_name + ")" + see};
                value = argv[++i];
            }
        } else if (inline_value) {
            throw UsageError{"option " + shown + " takes no value" + see};
        }
        out.values_[o->long_name].push_back(value);
    }
    return out;
}

void print_options(FILE* out, const std::vector<OptionSpec>& spec) {
    for (const auto& o : spec) {
        std::string left = o.short_name ? std::string("-") + o.short_name + ", " : std::string("    ");
        left += std::string("--") + o.long_name;
        if (o.value_name) left += std::string(" ") + o.value_name;
        if (left.size() < 24) left.resize(24, ' ');
        else left += "\n                          ";
        std::fprintf(out, "  %s%s\n", left.c_str(), o.help);
    }
}

int64_t parse_int_option(const Args& args, const std::string& name, int64_t min, int64_t max, int64_t fallback) {
    if (!args.has(name)) return fallback;
    std::string v = args.get(name);
    char* end = nullptr;
    errno = 0;
    long long n = std::strtoll(v.c_str(), &end, 10);
    if (v.empty() || *end != '\0' || errno != 0 || n < min || n > max)
        throw UsageError{"--" + name + " " + v + ": expected a whole number from " + std::to_string(min) + " to " +
                         std::to_string(max)};
    return n;
}

// ---------------------------------------------------------------------------
// Time

// One implementation, the replicator's (replicator/util.h); the CLI prints
// "-" where the replicator's status says "unknown".
int64_t now_us() { return replicator::now_us(); }
std::string format_time_us(int64_t us) { return us <= 0 ? "-" : replicator::fmt_time_us(us); }
std::string format_time_table(int64_t us) { return replicator::fmt_time_table_us(us); }
std::optional<int64_t> parse_time(std::string_view s) { return replicator::parse_time_us(s); }

std::optional<int64_t> parse_time_or_age(std::string_view s, int64_t now) {
    if (auto t = parse_time(s)) return t;
    if (s.size() < 2) return std::nullopt;
    int64_t unit = 0;
    switch (s.back()) {
    case 's': unit = 1; break;
    case 'm': unit = 60; break;
    case 'h': unit = 3600; break;
    case 'd': unit = 86400; break;
    case 'w': unit = 7 * 86400; break;
    default: return std::nullopt;
    }
    std::string n(s.substr(0, s.size() - 1));
    char* end = nullptr;
    errno = 0;
    long long v = std::strtoll(n.c_str(), &end, 10);
    if (n.empty() || *end != '\0' || errno != 0 || v < 0 || v > 100'000'000 / unit * 1000) return std::nullopt;
    return now - static_cast<int64_t>(v) * unit * 1'000'000;
}

std::string format_age(int64_t us) {
    if (us < 0) return "in the future (clock skew?)";
    int64_t s = us / 1'000'000;
    char buf[64];
    if (s < 1) std::snprintf(buf, sizeof buf, "%lld ms ago", static_cast<long long>(us / 1000));
    else if (s < 120) std::snprintf(buf, sizeof buf, "%lld s ago", static_cast<long long>(s));
    else if (s < 7200) std::snprintf(buf, sizeof buf, "%lld min ago", static_cast<long long>(s / 60));
    else if (s < 172800) std::snprintf(buf, sizeof buf, "%lld h %lld min ago", static_cast<long long>(s / 3600),
                                       static_cast<long long>(s % 3600 / 60));
    else std::snprintf(buf, sizeof buf, "%lld days ago", static_cast<long long>(s / 86400));
    return buf;
}

std::string format_bytes(uint64_t n) {
    static const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
    if (n < 1024) return std::to_string(n) + " B";
    double v = static_cast<double>(n);
    int u = 0;
    while (v >= 1024 && u < 5) {
        v /= 1024;
        ++u;
    }
    char buf[32];
    std::snprintf(buf, sizeof buf, v < 10 ? "%.1f %s" : "%.0f %s", v, kUnits[u]);
    return buf;
}

// ---------------------------------------------------------------------------
// Context

Context::Context(std::string command, const Args& args) : command_(std::move(command)) {
    endpoint_flag_ = args.get("endpoint");
    bucket_flag_ = args.get("bucket");
    database_ = args.get("database");
    if (args.has("database")) {
        if (auto st = replicator::validate_db_id(database_); !st)
            throw UsageError{"-d: " + st.error().message + " (the id the application replicates under; see ls)"};
    }
    if (args.has("encryption-key") && args.has("encryption-passphrase"))
        throw UsageError{"--encryption-key and --encryption-passphrase: give one"};
    if (args.has("encryption-key")) {
        auto k = replicator::EncryptionSecret::key(args.get("encryption-key"), "--encryption-key");
        if (!k) throw UsageError{k.error().message};
        secret_flag_ = std::move(k).value();
    } else if (args.has("encryption-passphrase")) {
        auto k = replicator::EncryptionSecret::passphrase(args.get("encryption-passphrase"), "--encryption-passphrase");
        if (!k) throw UsageError{k.error().message};
        secret_flag_ = std::move(k).value();
    }
}

Result<std::shared_ptr<const replicator::Cipher>> Context::cipher(const std::string& db_id) {
    if (auto it = ciphers_.find(db_id); it != ciphers_.end()) return it->second;
    auto c = replicator::open_cipher(*client_, bucket_, db_id, config_.encryption, /*create=*/false);
    if (c) ciphers_[db_id] = *c;
    return c;
}

const std::string& Context::endpoint() const { return config_.s3.endpoint; }

bool Context::connect() {
    // The extension's own configuration path, with -e/-b/-d in the place of
    // URI parameters: the same defaults, the same validation.
    std::map<std::string, std::string> params;
    if (!endpoint_flag_.empty()) params["endpoint"] = endpoint_flag_;
    if (!bucket_flag_.empty()) params["bucket"] = bucket_flag_;
    // Errors reach the operator once, as this command's message; the
    // library's own warnings (each retry's give-up) would repeat them.
    // LIBSQL_BOTTOMLESS_LOG, read by load_config, still raises the level.
    log::set_level(log::Level::Error);
    // A key or passphrase on the command line replaces the environment's,
    // which is then not even validated.
    const s3::EnvLookup env = [flag = !secret_flag_.empty()](std::string_view name) -> std::optional<std::string> {
        if (flag && (name == "LIBSQL_BOTTOMLESS_ENCRYPTION_KEY" || name == "LIBSQL_BOTTOMLESS_ENCRYPTION_PASSPHRASE"))
            return std::nullopt;
        return s3::process_env()(name);
    };
    auto cfg = replicator::load_config("bottomless-cli", params, env);
    if (!cfg) {
        fail(cfg.error().message, cfg.error().code == "BadSetting" ? "fix or unset that variable" : "");
        return false;
    }
    config_ = std::move(cfg).value();
    if (!secret_flag_.empty()) config_.encryption = secret_flag_;  // the command line wins over the environment
    bucket_ = config_.bucket;
    if (database_.empty()) {
        if (auto env = s3::process_env()("LIBSQL_BOTTOMLESS_DATABASE_ID"); env && !env->empty()) database_ = *env;
    }
    client_ = std::make_unique<s3::Client>(config_.s3);
    return true;
}

std::string Context::known_databases() {
    auto dbs = replicator::list_databases(*client_, bucket_);
    if (!dbs) return {};
    if (dbs->empty()) return "the bucket holds no database";
    std::string s = "databases in bucket '" + bucket_ + "':";
    size_t shown = 0;
    for (const auto& d : *dbs) {
        if (++shown > 20) {
            s += " ... (" + std::to_string(dbs->size()) + " in all; see bottomless-cli ls)";
            break;
        }
        s += " " + log::printable(d, 200);  // a name from the server
    }
    return s;
}

std::optional<std::string> Context::database_id(const std::string& fallback) {
    if (!database_.empty()) return database_;
    if (!fallback.empty()) {
        if (replicator::validate_db_id(fallback)) return fallback;
    }
    std::string known = known_databases();
    fail("no database id: pass -d ID or set LIBSQL_BOTTOMLESS_DATABASE_ID" +
             (fallback.empty() ? std::string() : " ('" + fallback + "' is not a valid id)"),
         known);
    return std::nullopt;
}

int Context::fail(const Error& e, const std::string& context) {
    std::string msg = context.empty() ? std::string() : context + ": ";
    // Our own errors read best as their message; S3's carry code, status and
    // request id, which support needs.
    bool from_s3 = e.http_status != 0;
    msg += from_s3 ? e.describe() : e.message;
    std::string hint;
    int code = kExitFailure;
    switch (e.kind) {
    case ErrorKind::Auth:
        hint = "check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY; or AWS_PROFILE '" +
               config_.s3.profile +
               "' in ~/.aws/credentials or ~/.aws/config, with its role_arn, credential_process or web identity; "
               "or the container or instance role), that they may read bucket '" + bucket_ +
               "', and the system clock";
        break;
    case ErrorKind::NotFound:
        if (e.code == "NoSuchBucket")
            hint = "check -b/--bucket (LIBSQL_BOTTOMLESS_BUCKET) and -e/--endpoint (" +
                   (endpoint().empty() ? std::string("AWS") : endpoint()) + ")";
        if (e.code == "NoGeneration" || e.code == "NoReplica") {
            code = kExitNothing;
            if (e.message.find("has no generation") != std::string::npos) hint = known_databases();
        }
        break;
    case ErrorKind::Transport:
        hint = "is " + (endpoint().empty() ? std::string("AWS S3") : endpoint()) +
               " reachable? set -e/--endpoint or LIBSQL_BOTTOMLESS_ENDPOINT";
        break;
    case ErrorKind::Throttled:
    case ErrorKind::Server:
        hint = "the server failed repeatedly; try again later";
        break;
    case ErrorKind::Corrupt:
        hint = "run 'bottomless-cli verify --all' to see which generations are intact; restore an earlier point in "
               "time (--utc-time) or an older generation (-g, see ls)";
        break;
    default:
        break;
    }
    if (e.code == "EncryptionKeyRequired")
        hint = "pass --encryption-key or --encryption-passphrase (or set LIBSQL_BOTTOMLESS_ENCRYPTION_KEY / "
               "LIBSQL_BOTTOMLESS_ENCRYPTION_PASSPHRASE); 'ls' works without it";
    else if (e.code == "WrongEncryptionKey")
        hint = "use the key or passphrase this generation was written with ('ls -v' shows each generation's key id)";
    else if (e.code == "NotEncrypted")
        hint = "unset LIBSQL_BOTTOMLESS_ENCRYPTION_KEY/_PASSPHRASE and drop --encryption-key/--encryption-passphrase";
    else if (e.code == "NoKdfParams")
        hint = "a plaintext replica needs no key; one encrypted with a raw key needs --encryption-key";
    else if (e.code == "AuthenticationFailed")
        hint = "the object was tampered with or damaged in the bucket; " + hint;
    fail(msg, hint);
    return code;
}

int Context::fail(const std::string& message, const std::string& hint) {
    std::fprintf(stderr, "%s %s: %s\n", kProgram, command_.c_str(), message.c_str());
    if (!hint.empty()) std::fprintf(stderr, "  hint: %s\n", hint.c_str());
    return kExitFailure;
}

void Context::warn(const std::string& message) {
    std::fprintf(stderr, "%s %s: warning: %s\n", kProgram, command_.c_str(), message.c_str());
}

void Context::note(const std::string& message) {
    if (!quiet_) std::fprintf(stderr, "%s\n", message.c_str());
}

// ---------------------------------------------------------------------------
// Progress

bool stdout_is_terminal() { return ::isatty(STDOUT_FILENO) == 1; }

ProgressBar::ProgressBar(std::string label, bool enabled)
    : label_(std::move(label)), enabled_(enabled && stdout_is_terminal() && ::isatty(STDERR_FILENO) == 1),
      start_(std::chrono::steady_clock::now()) {}

ProgressBar::~ProgressBar() { finish(); }

void ProgressBar::update(uint64_t done, uint64_t total) {
    if (!enabled_) return;
    auto now = std::chrono::steady_clock::now();
    if (drawn_ && done < total && now - last_draw_ < std::chrono::milliseconds(100)) return;
    last_draw_ = now;
    draw(done, total);
}

void ProgressBar::draw(uint64_t done, uint64_t total) {
    constexpr int kWidth = 24;
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    double frac = total ? std::min(1.0, static_cast<double>(done) / static_cast<double>(total)) : 0.0;
    int fill = static_cast<int>(frac * kWidth);
    std::string bar(static_cast<size_t>(fill), '=');
    if (fill < kWidth) bar += '>';
    bar.resize(kWidth, ' ');
    double rate = secs > 0.05 ? static_cast<double>(done) / secs : 0;
    std::string eta = "--";
    if (rate > 0 && total > done) {
        auto left = static_cast<long long>(std::ceil(static_cast<double>(total - done) / rate));
        char buf[32];
        std::snprintf(buf, sizeof buf, "%lld:%02lld", left / 60, left % 60);
        eta = buf;
    } else if (total && done >= total) {
        eta = "0:00";
    }
    std::fprintf(stderr, "\r\033[K%s [%s] %3d%%  %s / %s  %s/s  ETA %s", label_.c_str(), bar.c_str(),
                 static_cast<int>(frac * 100), format_bytes(done).c_str(), format_bytes(total).c_str(),
                 format_bytes(static_cast<uint64_t>(rate)).c_str(), eta.c_str());
    std::fflush(stderr);
    drawn_ = true;
}

void ProgressBar::finish() {
    if (enabled_ && drawn_) {
        std::fprintf(stderr, "\r\033[K");
        std::fflush(stderr);
    }
    drawn_ = false;
}

// ---------------------------------------------------------------------------
// Interrupts: leave no temp file behind.

namespace {

// Restores of several databases run up to 16 at once (cmd_restore.cpp).
constexpr int kCleanupSlots = 16;
// Written by the main thread, read by the handler: fixed buffers, no allocation.
char g_cleanup[kCleanupSlots][4096];
std::atomic<bool> g_cleanup_used[kCleanupSlots];

void remove_tree_signal_safe(const char* path) {
    // A scratch directory holds at most the database and its -wal/-shm/-journal,
    // .restore-tmp and -bottomless (the restore's note) files; unlink those by
    // name, then the directory.
    if (::unlink(path) == 0) return;
    static const char* kInside[] = {"/db", "/db.restore-tmp", "/db-wal", "/db-shm", "/db-journal", "/db-bottomless"};
    char buf[4200];
    for (const char* s : kInside) {
        size_t n = std::strlen(path);
        if (n + std::strlen(s) + 1 > sizeof buf) continue;
        std::memcpy(buf, path, n);
        std::memcpy(buf + n, s, std::strlen(s) + 1);
        ::unlink(buf);
    }
    ::rmdir(path);
}

void on_signal(int sig) {
    for (int i = 0; i < kCleanupSlots; ++i)
        if (g_cleanup_used[i].load()) remove_tree_signal_safe(g_cleanup[i]);
    ::signal(sig, SIG_DFL);
    ::raise(sig);
}

}  // namespace

void cleanup_on_signal(const std::string& path) {
    if (path.size() >= sizeof g_cleanup[0]) return;
    for (int i = 0; i < kCleanupSlots; ++i) {
        if (!g_cleanup_used[i].load()) {
            std::memcpy(g_cleanup[i], path.c_str(), path.size() + 1);
            g_cleanup_used[i].store(true);
            return;
        }
    }
}

void forget_cleanup(const std::string& path) {
    for (int i = 0; i < kCleanupSlots; ++i)
        if (g_cleanup_used[i].load() && path == g_cleanup[i]) g_cleanup_used[i].store(false);
}

void install_signal_cleanup() {
    struct sigaction sa{};
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    for (int sig : {SIGINT, SIGTERM, SIGHUP}) ::sigaction(sig, &sa, nullptr);
}

}  // namespace bottomless::cli
