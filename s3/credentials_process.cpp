// Credentials from a profile's credential_process (see credentials.h): the
// command line split as sh would (no shell is run), the program spawned with
// its standard output read under a deadline and a size cap, its JSON parsed.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "s3/credentials.h"
#include "s3/credentials_internal.h"
#include "s3/log.h"

extern char** environ;

namespace bottomless::s3 {

using namespace credentials_detail;

Result<ExpiringCredentials> parse_process_json(std::string_view body, std::string_view source) {
    return json_credentials(body, source, true);
}

Result<std::vector<std::string>> split_command_line(std::string_view cmd) {
    std::vector<std::string> out;
    std::string cur;
    bool in_word = false;
    for (size_t i = 0; i < cmd.size(); ++i) {
        char c = cmd[i];
        if (c == ' ' || c == '\t' || c == '\n' || c == '\r') {
            if (in_word) out.push_back(std::move(cur)), cur.clear(), in_word = false;
        } else if (c == '\'') {
            auto end = cmd.find('\'', i + 1);
            if (end == std::string_view::npos)
                return make_error(ErrorKind::InvalidArgument, "credential_process: a ' quote is not closed", "BadCommand");
            cur.append(cmd.substr(i + 1, end - i - 1));
            i = end;
            in_word = true;
        } else if (c == '"') {
            size_t j = i + 1;
            for (; j < cmd.size() && cmd[j] != '"'; ++j) {
                // Inside "…" a backslash escapes only \ " $ ` and a newline, as in sh.
                if (cmd[j] == '\\' && j + 1 < cmd.size() && std::string_view("\\\"$`\n").find(cmd[j + 1]) != std::string_view::npos) ++j;
                cur += cmd[j];
            }
            if (j >= cmd.size())
                return make_error(ErrorKind::InvalidArgument, "credential_process: a \" quote is not closed", "BadCommand");
            i = j;
            in_word = true;
        } else if (c == '\\' && i + 1 < cmd.size()) {
            cur += cmd[++i];
            in_word = true;
        } else {
            cur += c;
            in_word = true;
        }
    }
    if (in_word) out.push_back(std::move(cur));
    if (out.empty()) return make_error(ErrorKind::InvalidArgument, "credential_process is empty", "BadCommand");
    return out;
}

namespace {

constexpr size_t kMaxProcessOutput = 1 << 20;

class ProcessSource final : public CredentialsSource {
public:
    explicit ProcessSource(ProcessSettings s) : s_(std::move(s)) {}
    std::string describe() const override {
        return "credential_process of profile " + safe(s_.profile.empty() ? "default" : s_.profile);
    }

    Result<ExpiringCredentials> fetch() override {
        auto argv = split_command_line(s_.command);
        if (!argv) return std::move(argv).error();
        std::string out;
        auto st = run(*argv, out);
        struct Wipe {
            std::string& s;
            ~Wipe() { secure_wipe(s); }
        } wipe_out{out};
        if (!st) return std::move(st).error();
        return parse_process_json(out, describe());
    }

private:
    Status run(const std::vector<std::string>& args, std::string& out) {
        auto fail = [&](const std::string& why) {
            return make_error(ErrorKind::Auth, describe() + " ('" + safe(args[0]) + "'): " + why, "CredentialProcessFailed");
        };
        int fds[2];
        if (::pipe2(fds, O_CLOEXEC) != 0) return fail(std::string("pipe: ") + std::strerror(errno));
        posix_spawn_file_actions_t fa;
        posix_spawn_file_actions_init(&fa);
        posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
        posix_spawn_file_actions_adddup2(&fa, fds[1], 1);
        std::vector<char*> cargv;
        for (const auto& a : args) cargv.push_back(const_cast<char*>(a.c_str()));
        cargv.push_back(nullptr);
        pid_t pid = -1;
        // posix_spawnp: no shell, PATH lookup as the SDKs do; safe in a
        // multi-threaded host (no fork of its threads' locks).
        int rc = posix_spawnp(&pid, cargv[0], &fa, nullptr, cargv.data(), environ);
        posix_spawn_file_actions_destroy(&fa);
        ::close(fds[1]);
        if (rc != 0) {
            ::close(fds[0]);
            return fail(std::string("cannot run it: ") + std::strerror(rc));
        }
        auto deadline = std::chrono::steady_clock::now() + s_.timeout;
        bool timed_out = false, too_long = false;
        char buf[4096];
        for (;;) {
            auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
            if (left.count() <= 0) {
                timed_out = true;
                break;
            }
            pollfd p{fds[0], POLLIN, 0};
            int pr = ::poll(&p, 1, static_cast<int>(std::min<int64_t>(left.count(), 1000)));
            if (pr < 0 && errno == EINTR) continue;
            if (pr <= 0) continue;
            ssize_t n = ::read(fds[0], buf, sizeof buf);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) break;
            out.append(buf, static_cast<size_t>(n));
            if (out.size() > kMaxProcessOutput) {
                too_long = true;
                break;
            }
        }
        secure_wipe(buf, sizeof buf);
        ::close(fds[0]);
        if (timed_out || too_long) ::kill(pid, SIGKILL);
        int status = 0;
        pid_t w;
        do {
            w = ::waitpid(pid, &status, 0);
        } while (w < 0 && errno == EINTR);
        if (timed_out) return fail("no answer within " + std::to_string(s_.timeout.count() / 1000) + " s; it was killed");
        if (too_long) return fail("it wrote more than 1 MiB; it was killed");
        // ECHILD: the host ignores SIGCHLD, the status is lost; judge by the output.
        if (w == pid && WIFEXITED(status) && WEXITSTATUS(status) != 0)
            return fail("it exited with status " + std::to_string(WEXITSTATUS(status)));
        if (w == pid && WIFSIGNALED(status)) return fail("it was killed by signal " + std::to_string(WTERMSIG(status)));
        return {};
    }

    ProcessSettings s_;
};

}  // namespace

std::unique_ptr<CredentialsSource> make_process_source(ProcessSettings settings) {
    return std::make_unique<ProcessSource>(std::move(settings));
}

}  // namespace bottomless::s3
