// The local replication state file: parsing (untrusted: the file may be
// stale, truncated or hand-edited) and the one atomic writer.
#include "replicator/state_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "s3/log.h"

namespace bottomless::replicator {

namespace {
constexpr size_t kMaxStateFileBytes = 1u << 20;
}

std::optional<LocalState> parse_state_file(std::string_view text, const std::string& path) {
    // Integers are type-checked before get<>(): a float such as 1e30
    // converted to an integer is undefined behaviour.
    auto u = [](const nlohmann::json& v, uint64_t max) {
        if (!v.is_number_unsigned() || v.get<uint64_t>() > max) throw std::runtime_error("integer field out of range");
        return v.get<uint64_t>();
    };
    auto i = [](const nlohmann::json& j, const char* key) -> int64_t {
        auto it = j.find(key);
        if (it == j.end()) return -1;
        if (!it->is_number_integer() || (it->is_number_unsigned() && it->get<uint64_t>() > INT64_MAX))
            throw std::runtime_error(std::string(key) + ": not an integer");
        return it->get<int64_t>();
    };
    try {
        std::string why;
        nlohmann::json j = parse_untrusted_json(text, 1u << 20, &why);
        if (j.is_discarded()) throw std::runtime_error(why);
        if (!j.is_object() || !j.contains("format") || !j["format"].is_number_unsigned() || j["format"] != 1)
            return std::nullopt;
        LocalState s;
        s.bucket = j.at("bucket");
        s.db_id = j.at("db_id");
        s.generation = j.at("generation");
        s.prev_sha256 = j.at("prev_sha256");
        s.seq = u(j.at("seq"), UINT64_MAX);
        const auto& p = j.at("position");
        s.position = WalPosition{static_cast<uint32_t>(u(p.at("salt1"), UINT32_MAX)),
                                 static_cast<uint32_t>(u(p.at("salt2"), UINT32_MAX)), u(p.at("frame"), UINT64_MAX),
                                 static_cast<uint32_t>(u(p.at("cksum1"), UINT32_MAX)),
                                 static_cast<uint32_t>(u(p.at("cksum2"), UINT32_MAX))};
        s.clean_close = j.value("clean_close", false);
        s.sync_pending = j.value("sync_pending", false);
        s.restored = j.value("restored", false);
        if (j.contains("lineage"))
            for (const auto& g : j["lineage"]) s.lineage.push_back(g.get<std::string>());
        s.db_size = i(j, "db_size");
        s.db_mtime_ns = i(j, "db_mtime_ns");
        s.db_ino = j.contains("db_ino") ? u(j["db_ino"], UINT64_MAX) : 0;
        if (j.contains("key_id")) s.key_id = j["key_id"].get<std::string>();
        if (j.contains("restarted")) {
            const auto& r = j.at("restarted");
            s.restarted = WalPosition{static_cast<uint32_t>(u(r.at("salt1"), UINT32_MAX)),
                                      static_cast<uint32_t>(u(r.at("salt2"), UINT32_MAX)), u(r.at("frame"), UINT64_MAX),
                                      0, 0};
        }
        if (j.contains("kdf")) s.kdf = j["kdf"].get<std::string>();
        if (j.contains("page_size")) s.page_size = static_cast<uint32_t>(u(j["page_size"], 65536));
        if (j.contains("db_pages")) s.db_pages = static_cast<uint32_t>(u(j["db_pages"], UINT32_MAX));
        if (j.contains("last_commit_us")) s.last_commit_us = i(j, "last_commit_us");
        if (j.contains("next_txns")) s.next_txns = u(j["next_txns"], UINT64_MAX);
        s.newest = s.restored && j.value("newest", false);
        return s;
    } catch (const std::exception& e) {
        log::warn("ignoring unreadable replication state " + path + ": " + e.what());
        return std::nullopt;
    }
}

std::optional<LocalState> read_state_file(const std::string& path) {
    int fd = ::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ELOOP) log::warn("ignoring replication state " + path + ": it is a symbolic link");
        return std::nullopt;
    }
    std::string text;
    char buf[16384];
    for (;;) {
        ssize_t n = ::read(fd, buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        text.append(buf, static_cast<size_t>(n));
        if (text.size() > kMaxStateFileBytes) {
            ::close(fd);
            log::warn("ignoring replication state " + path + ": larger than " +
                      std::to_string(kMaxStateFileBytes) + " bytes");
            return std::nullopt;
        }
    }
    ::close(fd);
    return parse_state_file(text, path);
}

Status write_state_file(const std::string& path, const LocalState& s) {
    nlohmann::json j;
    j["format"] = 1;
    j["bucket"] = s.bucket;
    j["db_id"] = s.db_id;
    j["generation"] = s.generation;
    j["seq"] = s.seq;
    j["prev_sha256"] = s.prev_sha256;
    j["position"] = {{"salt1", s.position.salt1}, {"salt2", s.position.salt2}, {"frame", s.position.frame},
                     {"cksum1", s.position.cksum1}, {"cksum2", s.position.cksum2}};
    j["updated_us"] = std::chrono::duration_cast<std::chrono::microseconds>(
                          std::chrono::system_clock::now().time_since_epoch())
                          .count();
    if (!s.lineage.empty()) j["lineage"] = s.lineage;
    if (s.clean_close) j["clean_close"] = true;
    if (s.sync_pending) j["sync_pending"] = true;
    if (s.restored) j["restored"] = true;
    if (!s.key_id.empty()) j["key_id"] = s.key_id;
    if (s.restarted.frame)
        j["restarted"] = {{"salt1", s.restarted.salt1}, {"salt2", s.restarted.salt2}, {"frame", s.restarted.frame}};
    if (!s.kdf.empty()) j["kdf"] = s.kdf;
    if (s.clean_close || s.restored) {
        j["db_size"] = s.db_size;
        j["db_mtime_ns"] = s.db_mtime_ns;
        j["db_ino"] = s.db_ino;
    }
    if (s.restored && s.page_size) {
        j["page_size"] = s.page_size;
        j["db_pages"] = s.db_pages;
        j["last_commit_us"] = s.last_commit_us;
        if (s.next_txns) j["next_txns"] = s.next_txns;
        if (s.newest) j["newest"] = true;
    }
    const std::string text = j.dump() + "\n";

    // Unique per process and call: two processes (or a CLI restore next to a
    // running app) never write, or rename away, each other's temp file.
    static std::atomic<uint64_t> counter{0};
    const std::string tmp = path + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(counter.fetch_add(1));
    int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) return make_error(ErrorKind::Io, "cannot create " + tmp + ": " + std::strerror(errno), "StateFile");
    size_t off = 0;
    while (off < text.size()) {
        ssize_t n = ::write(fd, text.data() + off, text.size() - off);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            int e = errno;
            ::close(fd);
            ::unlink(tmp.c_str());
            return make_error(ErrorKind::Io, "cannot write " + tmp + ": " + std::strerror(e), "StateFile");
        }
        off += static_cast<size_t>(n);
    }
    if (::close(fd) != 0 || ::rename(tmp.c_str(), path.c_str()) != 0) {
        int e = errno;
        ::unlink(tmp.c_str());
        return make_error(ErrorKind::Io, "cannot replace " + path + ": " + std::strerror(e), "StateFile");
    }
    return {};
}

}  // namespace bottomless::replicator
