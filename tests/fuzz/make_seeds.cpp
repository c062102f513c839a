// Writes the fuzzers' seed corpora (tests/fuzz/corpus/<harness>/) from the
// project's own encoders, so the seeds are real objects of the current
// format: plaintext and encrypted (with the fuzzing key, fuzz_common.h),
// compressed and not. Run by `scripts/fuzz.sh seeds`; the output is
// committed. Usage: fuzz_make_seeds <corpus-dir>
#include <sqlite3.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "fuzz_common.h"
#include "replicator/format.h"

using namespace bottomless;
using namespace bottomless::replicator;

namespace {

std::string g_root;

void put(const std::string& harness, const std::string& name, std::string_view bytes) {
    std::string dir = g_root + "/" + harness;
    ::mkdir(g_root.c_str(), 0755);
    ::mkdir(dir.c_str(), 0755);
    std::ofstream out(dir + "/" + name, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    if (!out) {
        std::perror(("write " + dir + "/" + name).c_str());
        std::exit(1);
    }
}

std::string page(uint32_t size, int fill) {
    std::string p(size, '\0');
    // Mostly zero, some text: compresses like a real page.
    for (uint32_t i = 0; i < size; i += 37) p[i] = static_cast<char>('a' + (fill + i) % 26);
    return p;
}

std::string header_json(std::string_view object) {
    return std::string(object.substr(fuzz::kPreambleSize, fuzz::be32_at(object, 12)));
}

// The body between header and trailer.
std::string body_of(std::string_view object) {
    size_t start = fuzz::kPreambleSize + fuzz::be32_at(object, 12);
    return std::string(object.substr(start, object.size() - start - fuzz::kTrailerSize));
}

// An encrypted object's preamble and header with another object's plaintext
// body: what fuzz::reseal() turns into a valid encrypted object.
std::string with_plain_body(std::string_view encrypted, std::string_view plain) {
    std::string out(encrypted.substr(0, fuzz::kPreambleSize + fuzz::be32_at(encrypted, 12)));
    out += body_of(plain);
    out.append(fuzz::kTrailerSize, '\0');
    return fuzz::with_trailer(out);
}

void segments(const std::string& gen) {
    SegmentHeader h;
    h.db_id = "seeddb";
    h.generation = gen;
    h.seq = 1;
    h.page_size = 512;
    h.start = WalPosition{0x11223344, 0x55667788, 0, 1, 2};
    h.end = WalPosition{0x11223344, 0x55667788, 3, 3, 4};
    h.prev_sha256 = std::string(64, 'c');
    h.txns = {SegmentTxn{2, 5, 1'700'000'000'000'000}, SegmentTxn{1, 6, 1'700'000'000'100'000}};
    std::vector<SegmentFrame> frames = {{1, PageBuf(page(512, 1))}, {5, PageBuf(page(512, 2))}, {6, PageBuf(page(512, 3))}};
    for (Compression c : {Compression::Zstd, Compression::None}) {
        h.compression = c;
        const std::string tag = c == Compression::Zstd ? "zstd" : "none";
        std::string sha;
        std::string plain = encode_segment(h, frames, &sha);
        std::string enc = encode_segment(h, frames, &sha, &fuzz::fixed_cipher());
        put("fuzz_segment", "plain-" + tag, plain);
        put("fuzz_segment", "encrypted-" + tag, enc);
        put("fuzz_segment", "encrypted-plainbody-" + tag, with_plain_body(enc, plain));
        put("fuzz_object_header", "segment-" + tag + ".json", header_json(plain));
        put("fuzz_object_header", "segment-encrypted-" + tag + ".json", header_json(enc));
        if (c == Compression::Zstd) put("fuzz_object_header", "segment-prefix", std::string_view(plain).substr(0, 80));
    }
    // Many small transactions, and a first segment without prev_sha256.
    h.compression = Compression::Zstd;
    h.prev_sha256.clear();
    h.txns.clear();
    frames.clear();
    for (uint32_t i = 1; i <= 12; ++i) {
        h.txns.push_back(SegmentTxn{1, i, 1'700'000'000'000'000 + i});
        frames.push_back({i, PageBuf(page(512, static_cast<int>(i)))});
    }
    h.end.frame = 12;
    std::string sha;
    put("fuzz_segment", "plain-12txns", encode_segment(h, frames, &sha));
}

std::string snapshot(const SnapshotHeader& h, uint32_t pages, const Cipher* cipher) {
    std::string out;
    SnapshotWriter w(h, [&out](std::string_view b) -> Status {
        out.append(b);
        return {};
    }, cipher);
    for (uint32_t i = 0; i < pages; ++i)
        if (!w.add_page(page(h.page_size, static_cast<int>(i)))) std::exit(2);
    if (!w.finish()) std::exit(3);
    return out;
}

void snapshots(const std::string& gen) {
    SnapshotHeader h;
    h.db_id = "seeddb";
    h.generation = gen;
    h.page_size = 512;
    h.db_pages = 4;
    h.created_us = 1'700'000'000'000'000;
    h.last_commit_us = 1'699'999'999'000'000;
    h.position = WalPosition{1, 2, 7, 3, 4};
    h.parent_generation = new_generation_id(1'600'000'000'000);
    h.parent_seq = 9;
    for (Compression c : {Compression::Zstd, Compression::None}) {
        h.compression = c;
        const std::string tag = c == Compression::Zstd ? "zstd" : "none";
        std::string plain = snapshot(h, 4, nullptr);
        std::string enc = snapshot(h, 4, &fuzz::fixed_cipher());
        put("fuzz_snapshot", "plain-" + tag, plain);
        if (c == Compression::Zstd) {  // format 2: 300 pages of 512 bytes, three frames
            SnapshotHeader big = h;
            big.db_pages = 300;
            put("fuzz_snapshot", "plain-v2-3frames", snapshot(big, 300, nullptr));
        }
        put("fuzz_snapshot", "encrypted-" + tag, enc);
        put("fuzz_snapshot", "encrypted-plainbody-" + tag, with_plain_body(enc, plain));
        put("fuzz_object_header", "snapshot-" + tag + ".json", header_json(plain));
        put("fuzz_object_header", "snapshot-encrypted-" + tag + ".json", header_json(enc));
        if (c == Compression::Zstd) put("fuzz_object_header", "snapshot-prefix", std::string_view(plain).substr(0, 80));
    }
    h.compression = Compression::Zstd;
    h.parent_generation.clear();
    h.db_pages = 1;
    put("fuzz_snapshot", "plain-1page", snapshot(h, 1, nullptr));
    h.page_size = 4096;
    h.db_pages = 2;
    put("fuzz_snapshot", "plain-4k", snapshot(h, 2, nullptr));
    // A header nested a little (the reader must survive any depth).
    put("fuzz_object_header", "nested.json",
        R"({"db_id":"x","generation":"g","page_size":4096,"db_pages":1,"extra":[[[[{"a":[[[]]]}]]]]})");
}

void wal() {
    // A real WAL written by SQLite: page size 512, a few transactions, the
    // last one open (its frames follow the last commit).
    char dir[] = "/tmp/fuzz-seeds-XXXXXX";
    if (!::mkdtemp(dir)) std::exit(4);
    std::string db = std::string(dir) + "/w.db";
    sqlite3* h = nullptr;
    sqlite3_open(db.c_str(), &h);
    auto exec = [h](const char* sql) {
        if (sqlite3_exec(h, sql, nullptr, nullptr, nullptr) != SQLITE_OK) {
            std::fprintf(stderr, "%s: %s\n", sql, sqlite3_errmsg(h));
            std::exit(5);
        }
    };
    exec("PRAGMA page_size=512; PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0;");
    exec("CREATE TABLE t(a INTEGER PRIMARY KEY, b TEXT);");
    exec("INSERT INTO t(b) VALUES ('one'), ('two');");
    exec("INSERT INTO t(b) SELECT b || a FROM t;");
    std::ifstream in(db + "-wal", std::ios::binary);
    std::ostringstream ss;
    ss << in.rdbuf();
    put("fuzz_wal", "sqlite-3txns", ss.str());
    put("fuzz_wal", "sqlite-header-only", ss.str().substr(0, 32));
    sqlite3_close(h);
    std::remove((db + "-wal").c_str());
    std::remove((db + "-shm").c_str());
    std::remove(db.c_str());
    ::rmdir(dir);
}

void texts(const std::string& gen) {
    put("fuzz_kdf", "scrypt-passphrase",
        std::string(R"({"format":1,"kdf":"scrypt","salt":")") + std::string(64, 'a') +
            R"(","n":16384,"r":8,"p":1})" + std::string(1, '\0') + "correct horse battery staple");
    put("fuzz_kdf", "scrypt-default-key",
        std::string(R"({"format":1,"kdf":"scrypt","salt":")") + std::string(64, '5') + R"(","n":32768,"r":8,"p":1})" +
            std::string(1, '\0') + std::string(64, 'f'));
    put("fuzz_kdf", "base64-key", std::string("{}") + std::string(1, '\0') + "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI=");

    put("fuzz_state_file", "replicator",
        R"({"bucket":"b","clean_close":true,"db_id":"seeddb","db_ino":1234,"db_mtime_ns":1700000000000000000,)"
        R"("db_size":8192,"format":1,"generation":")" + gen + R"(","lineage":[")" + gen +
            R"("],"position":{"cksum1":1,"cksum2":2,"frame":7,"salt1":3,"salt2":4},"prev_sha256":")" +
            std::string(64, 'd') + R"(","seq":3,"updated_us":1700000000000000})");
    put("fuzz_state_file", "restored",
        R"({"bucket":"b","db_id":"seeddb","format":1,"generation":")" + gen +
            R"(","position":{"cksum1":0,"cksum2":0,"frame":0,"salt1":0,"salt2":0},"prev_sha256":"","seq":0,)"
            R"("restored":true,"db_size":4096,"db_mtime_ns":1,"db_ino":2})");

    put("fuzz_aws_config", "config",
        "[default]\nregion = eu-west-1\nendpoint_url = http://127.0.0.1:7480\ns3 =\n  addressing_style = path\n"
        "  max_concurrent_requests = 4\n\n[profile   other]\nregion=us-east-2\naws_access_key_id=AKID\n"
        "aws_secret_access_key=SECRET\n# comment\n; comment\n");
    put("fuzz_aws_config", "credentials",
        "[default]\naws_access_key_id = AKIDEXAMPLE\naws_secret_access_key = wJalrXUtnFEMI/K7MDENG\n"
        "aws_session_token = token\n[other]\naws_access_key_id=A\naws_secret_access_key=B\n");
    put("fuzz_aws_config", "profile", "AWS_PROFILE=other\n[profile other]\nregion = ap-south-1\n[other]\n"
                                      "aws_access_key_id=A\naws_secret_access_key=B\n");

    put("fuzz_uri_config", "all",
        "endpoint=http://127.0.0.1:7480\nbucket=b\ndatabase_id=db1\ninitial_replication=force\nsync=true\n"
        "batch_interval_ms=250\nbatch_max_bytes=1048576\ncompression=none\nmax_pending_bytes=8388608\n"
        "sync_timeout_ms=5000\nshutdown_timeout_ms=1000\nsnapshot_after_bytes=0\nsnapshot_interval_s=3600\n"
        "auto_restore=false\nmax_requests_per_second=12.5\nlog=debug\nvfs=unix\nmode=rwc\n");
    put("fuzz_uri_config", "env",
        "$LIBSQL_BOTTOMLESS_BUCKET=envbucket\n$LIBSQL_BOTTOMLESS_BATCH_MAX_BYTES=65536\n"
        "$LIBSQL_BOTTOMLESS_ENCRYPTION_PASSPHRASE=pw\n$AWS_REGION=eu-central-1\n$LIBSQL_BOTTOMLESS_ENDPOINT=https://s3.example\n"
        "encryption_key=" + std::string(64, 'a') + "\n@/var/db/app.db\n");

    put("fuzz_s3_xml", "list",
        R"(<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">)"
        R"(<Name>b</Name><Prefix>db/</Prefix><KeyCount>2</KeyCount><MaxKeys>1000</MaxKeys><IsTruncated>true</IsTruncated>)"
        R"(<NextContinuationToken>tok&amp;1</NextContinuationToken><Contents><Key>db/g/seg-000000000001</Key>)"
        R"(<LastModified>2024-01-01T00:00:00.000Z</LastModified><ETag>&quot;abc&quot;</ETag><Size>1234</Size></Contents>)"
        R"(<Contents><Key>db/g/snapshot</Key><Size>99</Size></Contents><CommonPrefixes><Prefix>db/g/</Prefix></CommonPrefixes>)"
        R"(</ListBucketResult>)");
    put("fuzz_s3_xml", "error",
        R"(<?xml version="1.0" encoding="UTF-8"?><Error><Code>NoSuchKey</Code><Message>The key does not exist</Message>)"
        R"(<Resource>/b/k</Resource><RequestId>tx1</RequestId></Error>)");
    put("fuzz_s3_xml", "initiate",
        R"(<InitiateMultipartUploadResult><Bucket>b</Bucket><Key>k</Key><UploadId>2~abc</UploadId></InitiateMultipartUploadResult>)");
    put("fuzz_s3_xml", "complete",
        R"(<CompleteMultipartUploadResult><Location>http://x/b/k</Location><Bucket>b</Bucket><Key>k</Key><ETag>"e-2"</ETag></CompleteMultipartUploadResult>)");
    put("fuzz_s3_xml", "delete",
        R"(<DeleteResult><Deleted><Key>a</Key></Deleted><Error><Key>b</Key><Code>AccessDenied</Code><Message>no</Message></Error></DeleteResult>)");

    // ChunkOpener: chunk size, edit, position/argument, piece size, plaintext.
    std::string plain;
    for (int i = 0; i < 3000; ++i) plain.push_back(static_cast<char>('A' + i % 23));
    put("fuzz_chunk_opener", "untouched-3chunks", std::string("\0\0\0\0\0\0\0\0\0\0\x05", 11) + plain);
    put("fuzz_chunk_opener", "flipped", std::string("\0\x01\0\0\x01\x10\0\0\0\x03\x02", 11) + plain);
    put("fuzz_chunk_opener", "swapped", std::string("\0\x04\0\0\0\x01\0\0\0\x02\x01", 11) + plain);
    put("fuzz_chunk_opener", "empty", std::string("\x10\0\0\0\0\0\0\0\0\0\0", 11));
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s <corpus-dir>\n", argv[0]);
        return 2;
    }
    g_root = argv[1];
    const std::string gen = new_generation_id(1'700'000'000'000);
    segments(gen);
    snapshots(gen);
    wal();
    texts(gen);
    return 0;
}
