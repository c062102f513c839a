"""An application using the installed bottomless wheel (run by test_wheel.sh in a fresh venv).

    python wheel_app.py write DB_PATH BUCKET DATABASE_ID   -> prints the content hash after the flush
    python wheel_app.py hash DB_PATH                       -> the content hash of a plain file
    python wheel_app.py checks                             -> load()/loadable_path()/error checks
"""

import hashlib
import os
import sqlite3
import sys

import bottomless


def content_hash(conn):
    h = hashlib.sha256()
    for row in conn.execute("SELECT id, body, data FROM notes ORDER BY id"):
        h.update(repr(row).encode())
    return h.hexdigest()


def write(path, bucket, database_id):
    # bucket and database_id go in as keyword arguments (URI parameters), sync too:
    # each COMMIT returns once it is in S3.
    db = bottomless.connect(path, bucket=bucket, sync=True, database_id=database_id, batch_interval_ms=200)
    db.execute("PRAGMA journal_mode=wal")
    db.execute("CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT, data BLOB)")
    for t in range(20):
        with db:  # one transaction each
            db.executemany(
                "INSERT INTO notes(body, data) VALUES (?, ?)",
                [("note %d.%d é" % (t, i), os.urandom(64)) for i in range(25)],
            )
    with db:
        db.execute("DELETE FROM notes WHERE id % 7 = 0")
    status = db.execute("SELECT bottomless_flush()").fetchone()[0]
    assert '"generation"' in status, status
    print(content_hash(db))
    db.close()


def checks():
    path = bottomless.loadable_path()
    assert os.path.isfile(path), path
    assert os.path.dirname(path) == os.path.dirname(bottomless.__file__), path
    assert bottomless.__version__[0].isdigit(), bottomless.__version__

    # load(): the SQL functions are there, and extension loading is off again afterwards.
    conn = sqlite3.connect(":memory:")
    bottomless.load(conn)
    try:
        conn.execute("SELECT bottomless_status()").fetchone()
        raise AssertionError("bottomless_status() on a plain :memory: database did not fail")
    except sqlite3.OperationalError as e:
        assert "not opened with vfs=bottomless" in str(e), e
    try:
        conn.load_extension(path)
        raise AssertionError("load() left extension loading enabled")
    except sqlite3.OperationalError as e:
        assert "not authorized" in str(e), e

    # URI escaping: a file name with '?', '#', '&', '%' and a space stays one path.
    uri = bottomless.database_uri("/data/a b?c#d&e%f.db", bucket="x&y", sync=False)
    assert uri == "file:///data/a%20b%3Fc%23d%26e%25f.db?vfs=bottomless&bucket=x%26y&sync=0", uri

    # A Python whose sqlite3 cannot load extensions gets an error naming the cause.
    class NoExtensions:  # what sqlite3.Connection looks like in such a build
        pass

    try:
        bottomless.load(NoExtensions())
        raise AssertionError("load() accepted a connection without enable_load_extension")
    except bottomless.BottomlessError as e:
        assert "--enable-loadable-sqlite-extensions" in str(e), e
    print("checks ok")


def main():
    cmd = sys.argv[1]
    if cmd == "write":
        write(*sys.argv[2:5])
    elif cmd == "hash":
        print(content_hash(sqlite3.connect(sys.argv[2])))
    elif cmd == "checks":
        checks()
    elif cmd == "no-extensions":
        # Run by an interpreter whose sqlite3 has no enable_load_extension.
        try:
            bottomless.connect(sys.argv[2], bucket="unused")
        except bottomless.BottomlessError as e:
            print(e)
            return 0
        raise AssertionError("connect() did not refuse this Python")
    else:
        raise SystemExit("unknown command " + cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
