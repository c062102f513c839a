// The page digests a restore leaves next to the file it wrote,
// "<db>-bottomless-pages" (restore_pipeline.h, docs/FORMAT.md "The page
// digests"): an incremental restore across generations compares them with
// the new snapshot's page index instead of reading and hashing the copy.
//
//   "BTLSPDIG\n", a header line (JSON: what the state note says of the
//   file, then "\n"), the digests (16 bytes a page, page 1 first), SHA-256
//   of everything before it (32 bytes).
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

constexpr char kMagic[10] = "BTLSPDIG\n";
constexpr size_t kMagicSize = 9;
constexpr size_t kMaxHeader = 4096;

json header_of(const std::string& generation, uint64_t seq, uint64_t next_txns, const std::string& prev_sha256,
               uint32_t page_size, uint32_t db_pages, int64_t size, int64_t mtime_ns, uint64_t ino) {
    return {{"generation", generation}, {"seq", seq},           {"next_txns", next_txns}, {"prev_sha256", prev_sha256},
            {"page_size", page_size},   {"db_pages", db_pages}, {"db_size", size},        {"db_mtime_ns", mtime_ns},
            {"db_ino", ino}};
}

}  // namespace

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
    // page after the restore: past a quarter of the file and 64 MiB, none
    // are kept (the next incremental restore hashes the file instead).
    uint64_t reread = 0;
    for (uint32_t p = 1; p <= res.db_pages; ++p) reread += p > known || (p < d.touched.size() && d.touched[p]);
    if (reread > uint64_t{res.db_pages} / 4 && reread * ps > (64ull << 20)) return;
    std::string out(kMagic, kMagicSize);
    const std::string h = header_of(res.generation, res.seq, res.next_txns, res.last_sha256, ps, res.db_pages,
                                    static_cast<int64_t>(st.st_size),
                                    static_cast<int64_t>(st.st_mtim.tv_sec) * 1'000'000'000 + st.st_mtim.tv_nsec,
                                    static_cast<uint64_t>(st.st_ino))
                              .dump();
    out += h;  // one line: dump() writes no newline
    out += '\n';
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
    const uint64_t digests = uint64_t{note.db_pages} * kPageHashSize;
    const uint64_t least = kMagicSize + 1 + digests + 32;
    if (fd.fd < 0 || ::fstat(fd.fd, &st) != 0 || static_cast<uint64_t>(st.st_size) < least ||
        static_cast<uint64_t>(st.st_size) > least + kMaxHeader)
        return std::nullopt;
    std::string bytes(static_cast<size_t>(st.st_size), '\0');
    if (!pread_full(fd.fd, bytes.data(), bytes.size(), 0) || bytes.compare(0, kMagicSize, kMagic, kMagicSize) != 0)
        return std::nullopt;
    const s3::Sha256Digest sum = s3::sha256(std::string_view(bytes).substr(0, bytes.size() - 32));
    if (std::memcmp(sum.data(), bytes.data() + bytes.size() - 32, 32) != 0) return std::nullopt;
    const size_t header_end = bytes.size() - 32 - digests - 1;  // the header line's newline
    if (header_end < kMagicSize || bytes[header_end] != '\n') return std::nullopt;
    // Everything the note proves of the file must be what the digests were taken of.
    const json expect = header_of(note.generation, note.seq, note.next_txns, note.prev_sha256, note.page_size,
                                  note.db_pages, note.db_size, note.db_mtime_ns, note.db_ino);
    json got = parse_untrusted_json(std::string_view(bytes).substr(kMagicSize, header_end - kMagicSize), kMaxHeader);
    if (got.is_discarded() || got != expect) return std::nullopt;
    return bytes.substr(header_end + 1, digests);
}

}  // namespace bottomless::replicator::restore_detail

namespace bottomless::replicator {

std::string page_digests_path(const std::string& output_path) { return output_path + "-bottomless-pages"; }

Status check_page_digests(const std::string& output_path, bool* checked) {
    if (checked) *checked = false;
    auto note = read_state_file(output_path + "-bottomless");
    if (!note || !note->restored) return {};
    auto digests = restore_detail::read_page_digests(output_path, *note);
    if (!digests) return {};
    Fd fd(::open(output_path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
    if (fd.fd < 0) return make_error(ErrorKind::Io, "cannot open " + output_path + ": " + std::strerror(errno), "OpenFailed");
    const uint32_t ps = note->page_size;
    std::string page(ps, '\0');
    for (uint32_t p = 1; p <= note->db_pages; ++p) {
        if (!pread_full(fd.fd, page.data(), ps, uint64_t{p - 1} * ps))
            return make_error(ErrorKind::Io, "cannot read " + output_path + ": " + std::strerror(errno), "ReadFailed");
        if (page_hash(page) != std::string_view(*digests).substr(uint64_t{p - 1} * kPageHashSize, kPageHashSize))
            return make_error(ErrorKind::Corrupt,
                              "page " + std::to_string(p) + " of the restored database does not match its digest in "
                              "the snapshot's page index (generation " + note->generation +
                              "): an incremental restore across this generation could keep a wrong page; report it, "
                              "and restore such copies in full",
                              "PageIndexMismatch");
    }
    if (checked) *checked = true;
    return {};
}

}  // namespace bottomless::replicator
