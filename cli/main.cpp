// bottomless-cli: the operator's tool for a bottomless bucket — list
// generations, restore (latest, a generation, a point in time), verify, prune,
// and show replication status. Uses replicator/ and s3/, never vfs/.
//
// This file finds the command word, parses options (global ones are accepted
// before or after it), prints help and dispatches to cmd_*.cpp.
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "cli/common.h"
#include "replicator/format.h"

using namespace bottomless::cli;

namespace {

const std::vector<const Command*>& commands() {
    static const std::vector<const Command*> kCommands = {&ls_command(), &restore_command(), &verify_command(),
                                                          &rm_command(), &status_command()};
    return kCommands;
}

const Command* find_command(const std::string& name) {
    for (const auto* c : commands())
        if (name == c->name) return c;
    return nullptr;
}

void print_main_help(FILE* out) {
    std::fprintf(out,
                 "Usage: bottomless-cli [GLOBAL OPTIONS] COMMAND [OPTIONS]\n"
                 "\n"
                 "Browse a bottomless bucket and restore, verify or prune the SQLite databases\n"
                 "replicated into it.\n"
                 "\n"
                 "Commands:\n");
    for (const auto* c : commands()) std::fprintf(out, "  %-10s %s\n", c->name, c->summary);
    std::fprintf(out, "\nGlobal options:\n");
    print_options(out, global_options());
    std::fprintf(out,
                 "\n"
                 "Credentials and region come from the AWS environment variables and files, as\n"
                 "for the AWS CLI (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,\n"
                 "AWS_REGION, AWS_PROFILE, ~/.aws/credentials, ~/.aws/config).\n"
                 "LIBSQL_BOTTOMLESS_LOG=info|debug|trace logs S3 requests to stderr.\n"
                 "\n"
                 "Exit codes: 0 success, 1 failure, 2 usage error,\n"
                 "            3 nothing to restore (no generation for this database id, or none at that time).\n"
                 "\n"
                 "'bottomless-cli COMMAND --help' describes a command. Documentation: docs/CLI.md\n");
}

void print_command_help(FILE* out, const Command& c) {
    std::fprintf(out, "Usage: bottomless-cli [GLOBAL OPTIONS] %s\n\n%s\n\nOptions:\n", c.synopsis, c.description);
    print_options(out, c.options);
    std::fprintf(out, "\nGlobal options:\n");
    print_options(out, global_options());
    std::fprintf(out, "\nExit codes: 0 success, 1 failure, 2 usage error, 3 nothing to restore.\n");
}

bool global_takes_value(const std::string& a) {
    for (const auto& o : global_options()) {
        if (!o.value_name) continue;
        if (a == std::string("--") + o.long_name) return true;
        if (o.short_name && a.size() == 2 && a[0] == '-' && a[1] == o.short_name) return true;
    }
    return false;
}

}  // namespace

int main(int argc, char** argv) {
    std::vector<std::string> args(argv + 1, argv + argc);

    // The command is the first word that is neither an option nor the value
    // of a global option before it.
    size_t cmd_at = args.size();
    for (size_t i = 0; i < args.size(); ++i) {
        const std::string& a = args[i];
        if (a == "--") break;
        if (global_takes_value(a)) {
            ++i;
            continue;
        }
        if (!a.empty() && a[0] == '-') continue;
        cmd_at = i;
        break;
    }
    std::string name = cmd_at < args.size() ? args[cmd_at] : std::string();
    if (name == "help") {
        // "bottomless-cli help [COMMAND]"
        const Command* c = cmd_at + 1 < args.size() ? find_command(args[cmd_at + 1]) : nullptr;
        if (c) print_command_help(stdout, *c);
        else print_main_help(stdout);
        return kExitOk;
    }
    const Command* cmd = name.empty() ? nullptr : find_command(name);
    if (!name.empty() && !cmd) {
        std::fprintf(stderr, "%s: unknown command '%s' (commands: ls, restore, verify, rm, status; see --help)\n",
                     kProgram, name.c_str());
        return kExitUsage;
    }
    std::vector<std::string> rest;
    for (size_t i = 0; i < args.size(); ++i)
        if (i != cmd_at) rest.push_back(args[i]);

    Args parsed;
    try {
        parsed = parse_args(rest, cmd ? cmd->options : std::vector<OptionSpec>{}, cmd ? cmd->name : nullptr);
    } catch (const UsageError& e) {
        std::fprintf(stderr, "%s: %s\n", kProgram, e.message.c_str());
        return kExitUsage;
    }
    if (parsed.has("version")) {
        std::printf("bottomless-cli %s (object format %u)\n", BOTTOMLESS_VERSION,
                    bottomless::replicator::kFormatVersion);
        return kExitOk;
    }
    if (parsed.has("help")) {
        if (cmd) print_command_help(stdout, *cmd);
        else print_main_help(stdout);
        return kExitOk;
    }
    if (!cmd) {
        print_main_help(stderr);
        return kExitUsage;
    }

    install_signal_cleanup();
    try {
        Context ctx(cmd->name, parsed);
        return cmd->run(ctx, parsed);
    } catch (const UsageError& e) {
        std::fprintf(stderr, "%s %s: %s (see bottomless-cli %s --help)\n", kProgram, cmd->name, e.message.c_str(),
                     cmd->name);
        return kExitUsage;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "%s %s: internal error: %s\n", kProgram, cmd->name, e.what());
        return kExitFailure;
    }
}
