// What every bottomless-cli subcommand shares: exit codes, option parsing,
// the connection context (bucket, database id, S3 client built from the same
// environment the extension reads), error reporting with a hint of what to
// do, time and size formatting, and the terminal progress bar.
//
// One file per subcommand (cmd_*.cpp) defines a Command; main.cpp dispatches.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "replicator/config.h"
#include "s3/client.h"
#include "s3/result.h"

namespace bottomless::cli {

// Exit codes (docs/CLI.md).
constexpr int kExitOk = 0;
constexpr int kExitFailure = 1;   // anything went wrong: S3, corruption, local files, a refusal
constexpr int kExitUsage = 2;     // bad command line
constexpr int kExitNothing = 3;   // nothing to restore/verify: no generation (at that time) for this database id

constexpr const char* kProgram = "bottomless-cli";

// ---- command line ----

struct OptionSpec {
    char short_name = 0;         // 0: long only
    const char* long_name;       // without "--"
    const char* value_name;      // nullptr: a flag
    const char* help;
};

// Parsed options of one command: long name -> values (flags get "").
class Args {
public:
    bool has(const std::string& name) const { return values_.count(name) > 0; }
    // The last value given (later options win, as in most Unix tools).
    std::string get(const std::string& name, const std::string& fallback = {}) const;
    // Every value given, in order (repeatable options).
    std::vector<std::string> all(const std::string& name) const;
    const std::vector<std::string>& positional() const { return positional_; }

private:
    friend Args parse_args(const std::vector<std::string>&, const std::vector<OptionSpec>&, const char*);
    std::map<std::string, std::vector<std::string>> values_;
    std::vector<std::string> positional_;
};

// A malformed command line: main prints it with a pointer to --help, exit 2.
struct UsageError {
    std::string message;
};

class Context;

struct Command {
    const char* name;
    const char* summary;     // one line for the command list
    const char* synopsis;    // "restore [OPTIONS]"
    const char* description; // paragraphs after the synopsis
    std::vector<OptionSpec> options;
    int (*run)(Context& ctx, const Args& args);
};

const Command& ls_command();
const Command& restore_command();
const Command& verify_command();
const Command& rm_command();
const Command& status_command();

// The global options, accepted before or after the command name.
const std::vector<OptionSpec>& global_options();

// Parses argv (without the program name and the command word) against the
// global options plus `spec`. Throws UsageError.
Args parse_args(const std::vector<std::string>& argv, const std::vector<OptionSpec>& spec, const char* command);

void print_options(FILE* out, const std::vector<OptionSpec>& spec);

// Option values. Each throws UsageError naming the option on a bad value.
int64_t parse_int_option(const Args& args, const std::string& name, int64_t min, int64_t max, int64_t fallback);

// ---- time ----

int64_t now_us();
// "2026-03-01T10:42:17.123456Z" (RFC 3339, UTC, microseconds); "-" for 0.
std::string format_time_us(int64_t us);
// "2026-03-01 10:42:17.123456" (accepted back by --utc-time); "-" for 0.
std::string format_time_table(int64_t us);
// RFC 3339 (with T or a space, fraction and offset optional; no offset: UTC),
// "YYYY-MM-DD HH:MM[:SS[.frac]]" (UTC) or "YYYY-MM-DD" (midnight UTC). A
// fraction finer than a microsecond is truncated (never rounded up: "at or
// before T" must not take in a later transaction).
std::optional<int64_t> parse_time(std::string_view text);
// A point in time or an age relative to now: "7d", "12h", "30m", "90s", "2w".
std::optional<int64_t> parse_time_or_age(std::string_view text, int64_t now);
// "3 s ago", "2 h 5 min ago".
std::string format_age(int64_t us);

// ---- sizes ----

std::string format_bytes(uint64_t n);  // "519 B", "1.2 KiB", "3.4 MiB"

// ---- the connection ----

class Context {
public:
    Context(std::string command, const Args& args);

    // Builds the configuration (environment, AWS files, -e/-b/-d) and the
    // client. Returns false after printing the error.
    bool connect();

    const std::string& command() const { return command_; }
    const std::string& bucket() const { return bucket_; }
    const std::string& endpoint() const;
    s3::Client& client() { return *client_; }
    const replicator::ReplicatorConfig& config() const { return config_; }

    // The database id: -d, LIBSQL_BOTTOMLESS_DATABASE_ID, else `fallback`
    // (e.g. the restore target's file name, as the extension derives it).
    // Prints an error listing the ids in the bucket when there is none.
    std::optional<std::string> database_id(const std::string& fallback = {});
    bool has_explicit_database() const { return !database_.empty(); }

    bool quiet() const { return quiet_; }
    void set_quiet(bool q) { quiet_ = q; }

    // Prints "bottomless-cli CMD: MESSAGE" and a hint for the error's kind;
    // returns the exit code for it (kExitNothing for "no generation").
    int fail(const Error& e, const std::string& context = {});
    // Prints an error of our own; returns kExitFailure.
    int fail(const std::string& message, const std::string& hint = {});
    void warn(const std::string& message);
    // Informational lines on stderr unless -q.
    void note(const std::string& message);

    // Ids of the databases in the bucket, for "no such database" messages.
    std::string known_databases();

    // Whether a key or passphrase was given (--encryption-key/-passphrase or
    // the environment), and the key for db_id (a passphrase is derived once
    // per database; null without a secret).
    bool has_encryption() const { return !config_.encryption.empty(); }
    Result<std::shared_ptr<const replicator::Cipher>> cipher(const std::string& db_id);

private:
    std::string command_;
    std::string endpoint_flag_, bucket_flag_, database_;
    replicator::EncryptionSecret secret_flag_;
    std::map<std::string, std::shared_ptr<const replicator::Cipher>> ciphers_;
    std::string bucket_;
    bool quiet_ = false;
    replicator::ReplicatorConfig config_;
    std::unique_ptr<s3::Client> client_;
};

// ---- progress ----

// A one-line progress bar on stderr: bytes, percent, rate, ETA. Drawn only
// when stdout and stderr are terminals and not -q; redrawn at most 10 times
// a second; erased by finish().
class ProgressBar {
public:
    ProgressBar(std::string label, bool enabled);
    ~ProgressBar();
    void update(uint64_t done, uint64_t total);
    void finish();
    bool enabled() const { return enabled_; }

private:
    void draw(uint64_t done, uint64_t total);
    std::string label_;
    bool enabled_;
    bool drawn_ = false;
    std::chrono::steady_clock::time_point start_, last_draw_{};
};

bool stdout_is_terminal();

// Files removed if the process is interrupted (SIGINT/SIGTERM/SIGHUP):
// restore's temp file, verify's scratch directory. At most 16 at a time.
void cleanup_on_signal(const std::string& path);
void forget_cleanup(const std::string& path);
void install_signal_cleanup();

}  // namespace bottomless::cli
