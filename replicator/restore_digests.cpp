// The page digests a restore leaves next to the file it wrote,
// "<db>-bottomless-pages" (restore_pipeline.h, docs/FORMAT.md "The page
// digests"): an incremental restore across generations compares them with
// the new snapshot's page index instead of reading and hashing the copy.
//
//   magic "BTLSPDIG" (8 bytes), header length (u32 big-endian), header
//   (JSON: what the state note says of the file), the digests (16 bytes a
//   page, page 1 first), SHA-256 of everything before it (32 bytes).
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <nlohmann/json.hpp>

#include "replicator/format.h"
#include "replicator/restore_pipeline.h"
#include "replicator/util.h"
#include "s3/crypto.h"
#include "s3/log.h"

namespace bottomless::replicator::restore_detail {

namespace {

using json = nlohmann::json;

constexpr char kMagic[9] = "BTLSPDIG";
constexpr size_t kMaxHeader = 4096;

json header_of(const std::string& generation, uint64_t seq, uint64_t next_txns, const std::string& prev_sha256,
               uint32_t page_size, uint32_t db_pages, int64_t size, int64_t mtime_ns, uint64_t ino) {
    return {{"generation", generation}, {"seq", seq},           {"next_txns", next_txns}, {"prev_sha256", prev_sha256},
            {"page_size", page_size},   {"db_pages", db_pages}, {"db_size", size},        {"db_mtime_ns", mtime_ns},
            {"db_ino", ino}};
}

void put_be32(std::string& out, uint32_t v) {
    for (int s = 24; s >= 0; s -= 8) out.push_back(static_cast<char>(v >> s));
}

}  // namespace

std::string page_digests_path(const std::string& output_path) { return output_path + "-bottomless-pages"; }

void write_page_digests(const std::string& output_path, const RestoreResult& res, const PageDigests& d) {
    const std::string path = page_digests_path(output_path), tmp = path + ".tmp";
    auto warn = [&](const std::string& why) {
        ::unlink(tmp.c_str());
        log::warn("cannot write " + path + " (" + why + "): the next incremental restore across generations reads and "
                  "hashes the file instead");
    };
    Fd fd(::open(output_path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
    struct stat st{};
    if (fd.fd < 0 || ::fstat(fd.fd, &st) != 0) return warn(std::strerror(errno));
    const uint32_t ps = res.page_size;
    if (static_cast<uint64_t>(st.st_size) != uint64_t{res.db_pages} * ps) return warn("the file is not its recorded size");
    const uint64_t known = d.hashes.size() / kPageHashSize;
    // Reading back what segments wrote costs a read and a hash of each such
    // page after the restore: past a quarter of the file, none are kept.
    uint64_t reread = 0;
    for (uint32_t p = 1; p <= res.db_pages; ++p) reread += p > known || (p < d.touched.size() && d.touched[p]);
    if (reread > uint64_t{res.db_pages} / 4) return;
    std::string out(kMagic, 8);
    const std::string h = header_of(res.generation, res.seq, res.next_txns, res.last_sha256, ps, res.db_pages,
                                    static_cast<int64_t>(st.st_size),
                                    static_cast<int64_t>(st.st_mtim.tv_sec) * 1'000'000'000 + st.st_mtim.tv_nsec,
                                    static_cast<uint64_t>(st.st_ino))
                              .dump();
    put_be32(out, static_cast<uint32_t>(h.size()));
    out += h;
    out.reserve(out.size() + uint64_t{res.db_pages} * kPageHashSize + 32);
    std::string page(ps, '\0');
    for (uint32_t p = 1; p <= res.db_pages; ++p) {
        const bool written = p < d.touched.size() && d.touched[p];
        if (p <= known && !written) {
            out.append(d.hashes, uint64_t{p - 1} * kPageHashSize, kPageHashSize);
            continue;
        }
        if (!pread_full(fd.fd, page.data(), ps, uint64_t{p - 1} * ps)) return warn(std::strerror(errno));
        out += page_hash(page);
    }
    const s3::Sha256Digest sum = s3::sha256(out);
    out.append(reinterpret_cast<const char*>(sum.data()), sum.size());
    ::unlink(tmp.c_str());
    Fd w(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644));
    if (w.fd < 0 || !pwrite_full(w.fd, out.data(), out.size(), 0)) return warn(std::strerror(errno));
    if (::rename(tmp.c_str(), path.c_str()) != 0) return warn(std::strerror(errno));
}

std::optional<std::string> read_page_digests(const std::string& output_path, const LocalState& note) {
    Fd fd(::open(page_digests_path(output_path).c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
    struct stat st{};
    const uint64_t want = 8 + 4 + uint64_t{note.db_pages} * kPageHashSize + 32;
    if (fd.fd < 0 || ::fstat(fd.fd, &st) != 0 || static_cast<uint64_t>(st.st_size) < want ||
        static_cast<uint64_t>(st.st_size) > want + kMaxHeader)
        return std::nullopt;
    std::string bytes(static_cast<size_t>(st.st_size), '\0');
    if (!pread_full(fd.fd, bytes.data(), bytes.size(), 0) || bytes.compare(0, 8, kMagic, 8) != 0) return std::nullopt;
    const s3::Sha256Digest sum = s3::sha256(std::string_view(bytes).substr(0, bytes.size() - 32));
    if (std::memcmp(sum.data(), bytes.data() + bytes.size() - 32, 32) != 0) return std::nullopt;
    const auto* u = reinterpret_cast<const unsigned char*>(bytes.data() + 8);
    const uint32_t hlen = (uint32_t{u[0]} << 24) | (uint32_t{u[1]} << 16) | (uint32_t{u[2]} << 8) | u[3];
    if (12 + uint64_t{hlen} + uint64_t{note.db_pages} * kPageHashSize + 32 != bytes.size()) return std::nullopt;
    // Everything the note proves of the file must be what the digests were taken of.
    const json expect = header_of(note.generation, note.seq, note.next_txns, note.prev_sha256, note.page_size,
                                  note.db_pages, note.db_size, note.db_mtime_ns, note.db_ino);
    json got = parse_untrusted_json(std::string_view(bytes).substr(12, hlen), kMaxHeader);
    if (got.is_discarded() || got != expect) return std::nullopt;
    return bytes.substr(12 + hlen, uint64_t{note.db_pages} * kPageHashSize);
}

}  // namespace bottomless::replicator::restore_detail
