#!/usr/bin/env python3
"""Plain SQLite, no bottomless: what a growing WAL costs a synchronous=FULL writer.

One connection commits 1-row INSERTs (100-byte blobs) for --seconds in each
variant, rounds alternating the order, medians printed:

  checkpointing  wal_autocheckpoint=1000 (SQLite's default): the WAL restarts
                 and commits overwrite the same blocks
  growing        wal_autocheckpoint=0: every commit appends to the file
  zero-filled    wal_autocheckpoint=0 on a WAL first extended with 200 MiB of
                 written zeros: commits overwrite blocks that exist
  fallocated     the same extension with posix_fallocate (unwritten extents)

Why bottomless extends a growing WAL with written zeros (vfs/vfs_wal.cpp,
grow_ahead; docs/BENCHMARKS.md "A WAL that grows").

    python3 bench/wal_growth.py [--seconds 4] [--rounds 3] [--dir /tmp]
"""
import argparse
import os
import sqlite3
import statistics
import tempfile
import time


def run(path, variant, seconds):
    for suffix in ("", "-wal", "-shm"):
        try:
            os.remove(path + suffix)
        except FileNotFoundError:
            pass
    c = sqlite3.connect(path, isolation_level=None)
    c.execute("PRAGMA journal_mode=wal")
    c.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    c.close()
    if variant in ("zero-filled", "fallocated"):
        fd = os.open(path + "-wal", os.O_WRONLY | os.O_CREAT, 0o644)
        if variant == "fallocated":
            os.posix_fallocate(fd, 0, 200 << 20)
        else:
            zeros = b"\0" * (1 << 20)
            for _ in range(200):
                os.write(fd, zeros)
        os.fsync(fd)
        os.close(fd)
    c = sqlite3.connect(path, isolation_level=None)
    c.execute("PRAGMA synchronous=FULL")
    c.execute("PRAGMA wal_autocheckpoint=%d" % (1000 if variant == "checkpointing" else 0))
    n = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        c.execute("INSERT INTO t(v) VALUES(randomblob(100))")
        n += 1
    rate = n / (time.monotonic() - t0)
    size = os.path.getsize(path + "-wal")
    c.close()
    return rate, size


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    a = ap.parse_args()
    variants = ["checkpointing", "growing", "zero-filled", "fallocated"]
    results = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        path = os.path.join(d, "bench.db")
        for r in range(a.rounds):
            order = variants if r % 2 == 0 else list(reversed(variants))
            for v in order:
                rate, size = run(path, v, a.seconds)
                results[v].append(rate)
                print("round %d %-14s %8.0f txn/s  WAL %4d MiB" % (r + 1, v, rate, size >> 20), flush=True)
    base = statistics.median(results["checkpointing"])
    print("| variant | txn/s (median) | ratio to checkpointing |")
    print("| --- | ---: | ---: |")
    for v in variants:
        m = statistics.median(results[v])
        print("| %s | %.0f | %.2f |" % (v, m, m / base))


if __name__ == "__main__":
    main()
