// bottomless-cli: the operator's tool for a bottomless bucket.
//
// This first version speaks to the bucket only (ls); restore, verify and rm
// come with the replicator's object format.
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "s3/client.h"
#include "s3/log.h"

namespace {

constexpr int kExitOk = 0;
constexpr int kExitFailure = 1;
constexpr int kExitUsage = 2;

void print_help(FILE* out) {
    std::fprintf(out,
                 "Usage: bottomless-cli [OPTIONS] COMMAND [ARGS]\n"
                 "\n"
                 "Browse a bottomless bucket and restore SQLite databases from it.\n"
                 "\n"
                 "Options:\n"
                 "  -e, --endpoint URL    S3 endpoint (default: LIBSQL_BOTTOMLESS_ENDPOINT, AWS_ENDPOINT_URL_S3,\n"
                 "                        AWS_ENDPOINT_URL, else AWS)\n"
                 "  -b, --bucket NAME     bucket (default: LIBSQL_BOTTOMLESS_BUCKET, else \"bottomless\")\n"
                 "  -d, --database ID     database id (default: LIBSQL_BOTTOMLESS_DATABASE_ID)\n"
                 "  -h, --help            show this help\n"
                 "      --version         show the version\n"
                 "\n"
                 "Commands:\n"
                 "  ls                    list the databases in the bucket, or with -d the objects of one\n"
                 "\n"
                 "Credentials and region come from the AWS environment variables and files\n"
                 "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws/credentials, ...).\n"
                 "Exit codes: 0 success, 1 failure, 2 usage error.\n");
}

struct Options {
    std::string endpoint, bucket, database, command;
    std::vector<std::string> args;
};

bool take_value(int& i, int argc, char** argv, std::string& out) {
    const char* arg = argv[i];
    if (const char* eq = std::strchr(arg, '='); eq && arg[1] == '-') {
        out = eq + 1;
        return true;
    }
    if (i + 1 >= argc) {
        std::fprintf(stderr, "bottomless-cli: option %s needs a value (see --help)\n", arg);
        return false;
    }
    out = argv[++i];
    return true;
}

bool is_opt(const char* arg, const char* s, const char* l) {
    size_t n = std::strlen(l);
    return std::strcmp(arg, s) == 0 || std::strcmp(arg, l) == 0 || (std::strncmp(arg, l, n) == 0 && arg[n] == '=');
}

int cmd_ls(const Options& o, bottomless::s3::Client& client) {
    if (o.database.empty()) {
        bottomless::s3::ListRequest req;
        req.delimiter = "/";
        int n = 0;
        auto st = client.list_objects(o.bucket, req, [&](const bottomless::s3::ListPage& page) {
            for (const auto& p : page.common_prefixes) {
                std::printf("%s\n", p.substr(0, p.size() - 1).c_str());
                ++n;
            }
            return true;
        });
        if (!st) {
            std::fprintf(stderr, "bottomless-cli: ls: %s\n", st.error().describe().c_str());
            return kExitFailure;
        }
        if (n == 0) std::fprintf(stderr, "bottomless-cli: bucket '%s' holds no databases\n", o.bucket.c_str());
        return kExitOk;
    }
    auto objects = client.list_all(o.bucket, o.database + "/");
    if (!objects) {
        std::fprintf(stderr, "bottomless-cli: ls: %s\n", objects.error().describe().c_str());
        return kExitFailure;
    }
    for (const auto& obj : *objects)
        std::printf("%-24s %12llu  %s\n", obj.last_modified.c_str(), static_cast<unsigned long long>(obj.size),
                    obj.key.c_str());
    return kExitOk;
}

}  // namespace

int main(int argc, char** argv) {
    Options o;
    for (int i = 1; i < argc; ++i) {
        const char* a = argv[i];
        if (!o.command.empty()) {
            o.args.emplace_back(a);
        } else if (is_opt(a, "-h", "--help")) {
            print_help(stdout);
            return kExitOk;
        } else if (std::strcmp(a, "--version") == 0) {
            std::printf("bottomless-cli %s\n", BOTTOMLESS_VERSION);
            return kExitOk;
        } else if (is_opt(a, "-e", "--endpoint")) {
            if (!take_value(i, argc, argv, o.endpoint)) return kExitUsage;
        } else if (is_opt(a, "-b", "--bucket")) {
            if (!take_value(i, argc, argv, o.bucket)) return kExitUsage;
        } else if (is_opt(a, "-d", "--database")) {
            if (!take_value(i, argc, argv, o.database)) return kExitUsage;
        } else if (a[0] == '-') {
            std::fprintf(stderr, "bottomless-cli: unknown option %s (see --help)\n", a);
            return kExitUsage;
        } else {
            o.command = a;
        }
    }
    if (o.command.empty()) {
        print_help(stderr);
        return kExitUsage;
    }
    if (o.command != "ls") {
        std::fprintf(stderr, "bottomless-cli: unknown command '%s' (see --help)\n", o.command.c_str());
        return kExitUsage;
    }
    auto env = bottomless::s3::process_env();
    if (o.bucket.empty()) o.bucket = env("LIBSQL_BOTTOMLESS_BUCKET").value_or("bottomless");
    if (o.database.empty()) o.database = env("LIBSQL_BOTTOMLESS_DATABASE_ID").value_or("");
    auto cfg = bottomless::s3::config_from_env(env);
    if (!cfg) {
        std::fprintf(stderr, "bottomless-cli: %s\n", cfg.error().message.c_str());
        return kExitFailure;
    }
    if (!o.endpoint.empty()) {
        cfg->endpoint = o.endpoint;
        cfg->path_style = true;
    }
    bottomless::s3::Client client(std::move(cfg).value());
    return cmd_ls(o, client);
}
