// S3 client benchmark, each figure beside curl moving the same bytes to the
// same server in the same run (the machine is shared and noisy: only ratios
// measured side by side mean anything).
//
//   small objects: N x 4 KiB PUTs, 1 thread and 8 threads
//       ours                      vs  one curl process, keep-alive (-K list, -Z for 8)
//                                     and curl with "Connection: close" (no keep-alive)
//   large object:  100 MiB PUT and GET
//       ours (multipart PUT; GET to a file: parallel ranges + fsync)  vs  curl -T / curl -o + sync
//       ours (one streamed GET, bytes discarded)  vs  curl -o /dev/null
//
// curl gets presigned URLs made by our signer, so it spends nothing on
// signing or hashing: the ratios are an upper bound on our overhead.
//
// Usage (server from scripts/s3-server.sh, env from its `env` command):
//   build/bench/s3_bench [--small N] [--large-mib M] [--rounds R]
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "s3/client.h"

using namespace bottomless;
using Clock = std::chrono::steady_clock;

namespace {

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

void check(bool ok, const std::string& what) {
    if (!ok) {
        std::fprintf(stderr, "s3_bench: %s\n", what.c_str());
        std::exit(1);
    }
}

double run_shell(const std::string& cmd) {
    auto t0 = Clock::now();
    int rc = std::system(cmd.c_str());
    double s = seconds_since(t0);
    check(rc == 0, "command failed (" + std::to_string(rc) + "): " + cmd.substr(0, 200));
    return s;
}

std::string random_bytes(size_t n) {
    std::mt19937_64 rng(12345);
    std::string s(n, '\0');
    for (size_t i = 0; i + 8 <= n; i += 8) {
        uint64_t v = rng();
        std::memcpy(s.data() + i, &v, 8);
    }
    return s;
}

void write_file(const std::string& path, const std::string& data) {
    std::ofstream out(path, std::ios::binary);
    out.write(data.data(), static_cast<std::streamsize>(data.size()));
    check(out.good(), "cannot write " + path);
}

// A curl config file uploading `file` to each URL.
std::string curl_config(const std::string& dir, const std::string& name, const std::vector<std::string>& urls,
                        const std::string& file) {
    std::string path = dir + "/" + name;
    std::ofstream out(path);
    for (const auto& u : urls) out << "url = \"" << u << "\"\nupload-file = \"" << file << "\"\noutput = /dev/null\n";
    return path;
}

}  // namespace

int main(int argc, char** argv) {
    int small_n = 2000;
    int large_mib = 100;
    int rounds = 3;
    for (int i = 1; i + 1 < argc; i += 2) {
        std::string a = argv[i];
        if (a == "--small") small_n = std::atoi(argv[i + 1]);
        else if (a == "--large-mib") large_mib = std::atoi(argv[i + 1]);
        else if (a == "--rounds") rounds = std::atoi(argv[i + 1]);
    }
    auto client_r = s3::Client::from_env();
    check(client_r.ok(), client_r.ok() ? "" : client_r.error().describe());
    s3::Client& client = **client_r;
    std::string bucket = "bench-" + std::to_string(::getpid());
    check(client.create_bucket(bucket).ok(), "cannot create bucket");

    char tmpl[] = "/tmp/bottomless-bench-XXXXXX";
    check(mkdtemp(tmpl) != nullptr, "mkdtemp");
    std::string dir = tmpl;
    std::string small = random_bytes(4096);
    write_file(dir + "/small", small);

    std::printf("# S3 client vs curl, same server, same run (%d rounds, medians)\n", rounds);
    std::printf("endpoint: %s\n\n", client.config().endpoint.c_str());

    // ---- small objects ----
    for (int threads : {1, 8}) {
        std::vector<double> ours, curl_ka, curl_close;
        for (int r = 0; r < rounds; ++r) {
            std::atomic<int> next{0};
            auto t0 = Clock::now();
            std::vector<std::thread> ts;
            for (int t = 0; t < threads; ++t)
                ts.emplace_back([&] {
                    for (int i; (i = next.fetch_add(1)) < small_n;)
                        check(client.put_object(bucket, "ours/" + std::to_string(i), small).ok(), "put failed");
                });
            for (auto& t : ts) t.join();
            ours.push_back(small_n / seconds_since(t0));

            std::vector<std::string> urls;
            for (int i = 0; i < small_n; ++i)
                urls.push_back(client.presign("PUT", bucket, "curl/" + std::to_string(i), std::chrono::seconds(3600)));
            std::string cfg = curl_config(dir, "small.cfg", urls, dir + "/small");
            std::string par = threads > 1 ? " -Z --parallel-max " + std::to_string(threads) : "";
            curl_ka.push_back(small_n / run_shell("curl -sS --no-progress-meter --fail" + par + " -K " + cfg));
            if (threads == 1)
                curl_close.push_back(small_n / run_shell("curl -sS --fail -H 'Connection: close' -K " + cfg));
        }
        double o = median(ours), c = median(curl_ka);
        std::printf("4 KiB PUT, %d thread%s: ours %.0f/s, curl keep-alive %.0f/s -> ratio %.2f", threads,
                    threads > 1 ? "s" : "", o, c, o / c);
        if (!curl_close.empty())
            std::printf("; curl without keep-alive %.0f/s (keep-alive gain x%.2f)", median(curl_close),
                        c / median(curl_close));
        std::printf("\n");
    }

    // ---- large object ----
    std::string big_path = dir + "/big", got_ours = dir + "/got-ours", got_curl = dir + "/got-curl";
    write_file(big_path, random_bytes(static_cast<size_t>(large_mib) << 20));
    double mib = large_mib;
    std::vector<double> put_ours, put_curl, get_ours, get_curl, stream_ours, stream_curl;
    struct Discard : s3::http::BodySink {
        bool write(const char*, size_t) override { return true; }
        bool reset() override { return true; }
    } discard;
    for (int r = 0; r < rounds; ++r) {
        auto t0 = Clock::now();
        check(client.put_object_from_file(bucket, "big-ours", big_path).ok(), "large put failed");
        put_ours.push_back(mib / seconds_since(t0));
        std::string put_url = client.presign("PUT", bucket, "big-curl", std::chrono::seconds(3600));
        put_curl.push_back(mib / run_shell("curl -sS --fail -o /dev/null -T " + big_path + " '" + put_url + "'"));

        t0 = Clock::now();
        check(client.get_object_to_file(bucket, "big-ours", got_ours).ok(), "large get failed");
        get_ours.push_back(mib / seconds_since(t0));
        std::string get_url = client.presign("GET", bucket, "big-curl", std::chrono::seconds(3600));
        get_curl.push_back(mib / run_shell("curl -sS --fail -o " + got_curl + " '" + get_url + "' && sync " + got_curl));

        t0 = Clock::now();
        check(client.get_object_to_sink(bucket, "big-ours", discard).ok(), "large streamed get failed");
        stream_ours.push_back(mib / seconds_since(t0));
        stream_curl.push_back(mib / run_shell("curl -sS --fail -o /dev/null '" + get_url + "'"));
    }
    std::printf("%d MiB PUT: ours %.0f MiB/s, curl %.0f MiB/s -> ratio %.2f\n", large_mib, median(put_ours),
                median(put_curl), median(put_ours) / median(put_curl));
    std::printf("%d MiB GET to a file (fsync): ours %.0f MiB/s, curl + sync %.0f MiB/s -> ratio %.2f\n", large_mib,
                median(get_ours), median(get_curl), median(get_ours) / median(get_curl));
    std::printf("%d MiB GET streamed (one connection, bytes discarded): ours %.0f MiB/s, curl -o /dev/null %.0f MiB/s"
                " -> ratio %.2f\n",
                large_mib, median(stream_ours), median(stream_curl), median(stream_ours) / median(stream_curl));

    auto st = client.stats();
    std::printf("\nclient: %llu requests, %llu retries\n", static_cast<unsigned long long>(st.requests),
                static_cast<unsigned long long>(st.retries));

    (void)client.delete_bucket_and_objects(bucket);
    std::string rm = "rm -rf " + dir;
    (void)std::system(rm.c_str());
    return 0;
}
