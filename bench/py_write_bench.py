#!/usr/bin/env python3
"""Write benchmark through Python's sqlite3 module: plain WAL vs bottomless async.

What an application written in Python runs: the stdlib sqlite3 module on the
system's libsqlite3, the loadable extension (build/bottomless.so) loaded with
conn.load_extension(), databases opened as file:...?vfs=bottomless. Each run
uses a fresh database in WAL mode; a transaction is `execute(INSERT)` +
`commit()` (1 row) or `executemany(INSERT, 100 rows)` + `commit()`. Cells:
synchronous=NORMAL and FULL x writer threads x rows per transaction. Rounds
alternate the order of plain and async (the machine is shared and noisy);
per cell it prints the median txn/s of each mode and the median of the
per-round ratios async/plain, as a markdown table (progress on stderr).

Usage (S3 env from scripts/s3-server.sh):
  eval "$(scripts/s3-server.sh env)"
  /usr/bin/python3 bench/py_write_bench.py --ext build/bottomless.so [--seconds 3] [--rounds 5]
      [--sync NORMAL|FULL|both] [--writers 1] [--rows 1,100]

Needs a Python whose sqlite3 module allows extension loading (Debian's
/usr/bin/python3 does; python.org and pyenv builds often do not).
"""
import argparse
import datetime
import hashlib
import hmac
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from xml.etree import ElementTree

PAYLOAD = "payload-payload-payload-payload-payload-payload-payload-payload-"
INSERT = "INSERT INTO t(a, b) VALUES(abs(random()) % 1000000, ?)"


def connect(uri):
    # Default isolation level, as applications use the module: an INSERT opens a
    # transaction, commit() ends it. Each thread opens its own connection.
    return sqlite3.connect(uri, uri=True, timeout=30)


def status(conn):
    return json.loads(conn.execute("SELECT bottomless_status()").fetchone()[0])


def run(mode, sync, writers, rows, seconds, workdir, bucket, rnd):
    name = f"py-{mode}-{sync}-w{writers}-r{rows}-{rnd}.db"
    sub = os.path.join(workdir, name + ".d")
    os.makedirs(sub)
    uri = "file:" + os.path.join(sub, name)
    if mode == "async":
        uri += "?vfs=bottomless&bucket=" + bucket
    setup = connect(uri)
    setup.execute("PRAGMA journal_mode=wal")
    setup.execute(f"PRAGMA synchronous={sync}")
    setup.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, a INTEGER, b TEXT)")
    setup.commit()
    if setup.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        sys.exit("py_write_bench: journal_mode is not wal")
    st0 = None
    if mode == "async":
        setup.execute("SELECT bottomless_flush()").fetchone()
        st0 = status(setup)

    batch = [(PAYLOAD + str(i),) for i in range(rows)]
    counts = [0] * writers
    start = threading.Barrier(writers + 1)
    t0 = [0.0]

    errors = []

    def writer(k):
        try:
            write(k)
        except Exception as e:  # a failed writer must fail the run, not shrink its count
            errors.append(e)
            start.abort()  # nobody waits forever for a writer that will never arrive

    def write(k):
        conn = connect(uri)
        conn.execute(f"PRAGMA synchronous={sync}")  # per connection, not persistent
        start.wait()
        n = 0
        deadline = t0[0] + seconds
        if rows == 1:
            while time.perf_counter() < deadline:
                conn.execute(INSERT, batch[0])
                conn.commit()
                n += 1
        else:
            while time.perf_counter() < deadline:
                conn.executemany(INSERT, batch)
                conn.commit()
                n += 1
        counts[k] = n
        conn.close()

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(writers)]
    for t in threads:
        t.start()
    t0[0] = time.perf_counter()
    try:
        start.wait()
    except threading.BrokenBarrierError:
        pass
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0[0]
    if errors:
        sys.exit(f"py_write_bench: {mode} writer failed: {errors[0]}")

    result = {"tps": sum(counts) / elapsed, "puts_per_min": None, "bytes_ratio": None}
    if mode == "async":
        setup.execute("SELECT bottomless_flush()").fetchone()
        st1 = status(setup)
        result["puts_per_min"] = (st1.get("put_requests", 0) - st0.get("put_requests", 0)) / (elapsed / 60)
        wal = st1.get("wal_bytes_shipped", 0) - st0.get("wal_bytes_shipped", 0)
        up = st1.get("segment_bytes_uploaded", 0) - st0.get("segment_bytes_uploaded", 0)
        result["bytes_ratio"] = up / wal if wal > 0 else None
    # The last close flushes and checkpoints: the next run starts with nothing of this one going.
    setup.close()
    shutil.rmtree(sub, ignore_errors=True)
    return result


def s3_request(method, bucket, key="", query=""):
    """One SigV4-signed request to LIBSQL_BOTTOMLESS_ENDPOINT (path-style), stdlib only: enough to tidy up."""
    endpoint = os.environ["LIBSQL_BOTTOMLESS_ENDPOINT"].rstrip("/")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    access, secret = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
    token = os.environ.get("AWS_SESSION_TOKEN")
    host = urllib.parse.urlsplit(endpoint).netloc
    path = "/" + bucket + ("/" + urllib.parse.quote(key, safe="/~") if key else "")
    now = datetime.datetime.now(datetime.timezone.utc)
    amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    empty = hashlib.sha256(b"").hexdigest()
    headers = {"host": host, "x-amz-content-sha256": empty, "x-amz-date": amz_date}
    if token:
        headers["x-amz-security-token"] = token
    names = sorted(headers)
    canonical = "\n".join([method, path, query, "".join(f"{h}:{headers[h]}\n" for h in names), ";".join(names), empty])
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    k = ("AWS4" + secret).encode()
    for part in (day, region, "s3", "aws4_request"):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    sig = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={access}/{scope}, SignedHeaders={';'.join(names)}, "
                                f"Signature={sig}")
    del headers["host"]
    req = urllib.request.Request(endpoint + path + ("?" + query if query else ""), method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.read()


def delete_bucket(bucket):
    ns = "{http://s3.amazonaws.com/doc/2006-03-01/}"
    while True:
        listing = ElementTree.fromstring(s3_request("GET", bucket, query="list-type=2&max-keys=1000"))
        keys = [e.text for e in listing.iter(ns + "Key")]
        for key in keys:
            s3_request("DELETE", bucket, key)
        if not keys:
            break
    s3_request("DELETE", bucket)


def ints(s):
    return [int(x) for x in s.split(",") if x]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ext", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "build", "bottomless.so"),
                    help="the loadable extension (default: build/bottomless.so)")
    ap.add_argument("--seconds", type=float, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sync", default="both", help="NORMAL, FULL or both")
    ap.add_argument("--writers", default="1", help="comma-separated writer thread counts (default 1)")
    ap.add_argument("--rows", default="1,100", help="comma-separated rows per transaction")
    a = ap.parse_args()

    if not os.environ.get("LIBSQL_BOTTOMLESS_ENDPOINT"):
        sys.exit('py_write_bench: LIBSQL_BOTTOMLESS_ENDPOINT is not set (eval "$(scripts/s3-server.sh env)")')
    syncs = ["NORMAL", "FULL"] if a.sync.lower() == "both" else [a.sync.upper()]
    cells = [(s, w, r) for s in syncs for w in ints(a.writers) for r in ints(a.rows)]

    loader = sqlite3.connect(":memory:")
    if not hasattr(loader, "enable_load_extension"):
        sys.exit("py_write_bench: this Python's sqlite3 cannot load extensions; run it with /usr/bin/python3")
    loader.enable_load_extension(True)
    # The VFS registers itself (permanently) when the extension loads.
    loader.load_extension(os.path.abspath(a.ext))
    loader.enable_load_extension(False)

    workdir = tempfile.mkdtemp(prefix="bottomless-pybench-")
    bucket = f"pybench-{os.getpid()}"
    modes = ["plain", "async"]
    res = {c: {m: [] for m in modes} for c in cells}
    began = time.monotonic()
    try:
        for rnd in range(a.rounds):
            order = modes if rnd % 2 == 0 else modes[::-1]
            for c in cells:
                line = f"round {rnd + 1}/{a.rounds} {c[0]:<6} w={c[1]} rows={c[2]:<3}"
                for m in order:
                    r = run(m, c[0], c[1], c[2], a.seconds, workdir, bucket, rnd)
                    res[c][m].append(r)
                    line += f"  {m} {r['tps']:.0f}"
                print(line, file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    took = time.monotonic() - began

    def med(xs):
        xs = [x for x in xs if x is not None]
        return statistics.median(xs) if xs else None

    print(f"py_write_bench: Python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}; {a.seconds:g} s per run, "
          f"{a.rounds} round(s) alternating plain/async; medians (run took {took:.0f} s)\n")
    print("| synchronous | writers | rows/txn | plain txn/s | async txn/s | async/plain | (min–max) | PUT/min | up/WAL B |")
    print("|---|---|---|---|---|---|---|---|---|")
    cell_ratios = []
    for c in cells:
        p = [r["tps"] for r in res[c]["plain"]]
        q = [r["tps"] for r in res[c]["async"]]
        ratios = [y / x for x, y in zip(p, q)]
        cell_ratios.append(med(ratios))
        puts = med([r["puts_per_min"] for r in res[c]["async"]])
        byt = med([r["bytes_ratio"] for r in res[c]["async"]])
        print(f"| {c[0]} | {c[1]} | {c[2]} | {med(p):.0f} | {med(q):.0f} | {med(ratios):.2f} | "
              f"{min(ratios):.2f}–{max(ratios):.2f} | {'' if puts is None else f'{puts:.0f}'} | "
              f"{'' if byt is None else f'{byt:.3f}'} |")
    print(f"\nasync/plain over the {len(cells)} cells: lowest cell {min(cell_ratios):.2f}, "
          f"median cell {med(cell_ratios):.2f}")

    try:
        delete_bucket(bucket)
    except Exception as e:  # a leftover bucket on the test server is harmless
        print(f"py_write_bench: could not delete bucket {bucket}: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
