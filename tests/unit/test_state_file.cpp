// The local state file "<database>-bottomless": one writer for the replicator
// and restore, atomic, private, never through a symlink, safe to write from
// several threads or processes at once.
#include <catch2/catch.hpp>

#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "replicator/state_file.h"

namespace fs = std::filesystem;
using namespace bottomless::replicator;

namespace {

struct Dir {
    fs::path path;
    Dir() {
        char tmpl[] = "/tmp/bottomless-state-XXXXXX";
        path = ::mkdtemp(tmpl);
    }
    ~Dir() { fs::remove_all(path); }
    std::string file(const std::string& n) const { return (path / n).string(); }
};

LocalState sample() {
    LocalState s;
    s.bucket = "b";
    s.db_id = "app.db";
    s.generation = "0000fe5dd0af00fa-558d4aa8";
    s.seq = 42;
    s.prev_sha256 = std::string(64, 'a');
    s.position = WalPosition{1, 2, 300, 4, 5};
    s.lineage = {"0000fe5dd0af00fa-558d4aa8"};
    s.clean_close = true;
    s.db_size = 8192;
    s.db_mtime_ns = 1234567890123;
    s.db_ino = 77;
    return s;
}

}  // namespace

TEST_CASE("the state file round-trips through its one writer and reader", "[state]") {
    Dir d;
    const std::string path = d.file("app.db-bottomless");
    REQUIRE(write_state_file(path, sample()).ok());
    auto back = read_state_file(path);
    REQUIRE(back);
    CHECK(back->bucket == "b");
    CHECK(back->db_id == "app.db");
    CHECK(back->seq == 42);
    CHECK(back->position == (WalPosition{1, 2, 300, 4, 5}));
    CHECK(back->lineage == std::vector<std::string>{"0000fe5dd0af00fa-558d4aa8"});
    CHECK(back->clean_close);
    CHECK_FALSE(back->restored);
    CHECK(back->db_size == 8192);
    CHECK(back->db_mtime_ns == 1234567890123);
    CHECK(back->db_ino == 77);
    // 0600: it holds WAL checksums, a function of page content.
    struct stat st{};
    REQUIRE(::stat(path.c_str(), &st) == 0);
    CHECK((st.st_mode & 0777) == 0600);
    // No temp file is left behind.
    CHECK(std::distance(fs::directory_iterator(d.path), fs::directory_iterator()) == 1);
}

TEST_CASE("the state file is never written or read through a symlink", "[state]") {
    Dir d;
    const std::string victim = d.file("victim");
    std::ofstream(victim) << "precious";
    const std::string path = d.file("app.db-bottomless");
    fs::create_symlink(victim, path);
    // Read: a symlink is not a state.
    CHECK_FALSE(read_state_file(path));
    // Write: the link itself is replaced, its target untouched.
    REQUIRE(write_state_file(path, sample()).ok());
    std::ifstream in(victim);
    std::string content((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    CHECK(content == "precious");
    CHECK_FALSE(fs::is_symlink(path));
    CHECK(read_state_file(path));
}

TEST_CASE("concurrent writers never take each other's temp file", "[state]") {
    // Before: every writer used "<path>.tmp", and a second process's rename
    // took the first one's file ("cannot rename ...: No such file").
    Dir d;
    const std::string path = d.file("app.db-bottomless");
    std::atomic<int> failures{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 8; ++t)
        threads.emplace_back([&, t] {
            LocalState s = sample();
            for (int i = 0; i < 100; ++i) {
                s.seq = static_cast<uint64_t>(t * 1000 + i);
                if (!write_state_file(path, s).ok()) ++failures;
            }
        });
    for (auto& th : threads) th.join();
    CHECK(failures.load() == 0);
    auto back = read_state_file(path);
    REQUIRE(back);
    CHECK(back->seq % 1000 == 99);
    CHECK(std::distance(fs::directory_iterator(d.path), fs::directory_iterator()) == 1);
}

TEST_CASE("an oversized or malformed state file proves nothing", "[state]") {
    Dir d;
    const std::string path = d.file("app.db-bottomless");
    std::ofstream(path) << std::string(2u << 20, ' ');
    CHECK_FALSE(read_state_file(path));
    std::ofstream(path, std::ios::trunc) << R"({"format":1,"bucket":"b","db_id":"a","generation":"g","prev_sha256":"",)"
                                         << R"("seq":1e30,"position":{"salt1":1,"salt2":2,"frame":3,"cksum1":4,"cksum2":5}})";
    CHECK_FALSE(read_state_file(path));
}
