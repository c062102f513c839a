"""bottomless: continuous replication of a SQLite database to S3, for Python's sqlite3.

The wheel bundles the loadable SQLite extension (``bottomless.so``); this
module loads it into a ``sqlite3.Connection``, the way sqlite-vec and other
SQLite extension packages do::

    import sqlite3, bottomless

    db = bottomless.connect("app.db", bucket="my-bucket")   # replicated
    db.execute("PRAGMA journal_mode=wal")
    db.execute("CREATE TABLE IF NOT EXISTS t(x)")
    with db:
        db.execute("INSERT INTO t VALUES (1)")
    db.execute("SELECT bottomless_flush()").fetchone()      # durable in S3

    conn = sqlite3.connect(":memory:")
    bottomless.load(conn)                  # the VFS and the bottomless_* SQL functions

Settings are those of docs/CONFIG.md (``sync``, ``database_id``,
``batch_interval_ms``, ...): keyword arguments of ``connect`` become URI
parameters; the S3 credentials come from the environment and ~/.aws, as for
the AWS CLI.

The extension needs a Python whose sqlite3 module can load extensions
(``sqlite3.Connection.enable_load_extension`` exists): Debian's python3 can;
Pythons built without ``--enable-loadable-sqlite-extensions`` (some pyenv and
python.org macOS builds) cannot, and ``load``/``connect`` say so.
"""

import os
import sqlite3
import urllib.parse

__all__ = ["connect", "database_uri", "load", "loadable_path", "BottomlessError", "__version__"]

__version__ = "@VERSION@"

# sqlite3.connect's own keyword arguments; every other keyword of connect() is a
# bottomless setting.
_SQLITE3_CONNECT_ARGS = frozenset(
    ["timeout", "detect_types", "isolation_level", "check_same_thread", "factory", "cached_statements", "autocommit"]
)


class BottomlessError(RuntimeError):
    """The extension cannot be loaded into this Python (see the message for what to do)."""


def loadable_path():
    """The path of the bundled loadable extension, for conn.load_extension() or sqlite3's `.load`."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "bottomless.so")


def _check_can_load(conn):
    if not hasattr(conn, "enable_load_extension"):
        raise BottomlessError(
            "this Python's sqlite3 module cannot load SQLite extensions: it was built without "
            "--enable-loadable-sqlite-extensions (sqlite3.Connection has no enable_load_extension). "
            "Use a Python that has it: Debian's /usr/bin/python3, or rebuild yours, e.g. "
            "PYTHON_CONFIGURE_OPTS=--enable-loadable-sqlite-extensions pyenv install 3.11"
        )


def load(conn):
    """Loads the bottomless extension into conn (a sqlite3.Connection).

    Registers the "bottomless" VFS for the whole process, the bottomless_* SQL
    functions on conn and on every connection opened afterwards. Extension
    loading is enabled only for the duration of the call.
    """
    _check_can_load(conn)
    path = loadable_path()
    if not os.path.exists(path):
        raise BottomlessError("the bundled extension is missing: " + path + " (reinstall the bottomless wheel)")
    conn.enable_load_extension(True)
    try:
        conn.load_extension(path)
    finally:
        conn.enable_load_extension(False)


def _setting_value(name, value):
    if isinstance(value, bool):
        return "1" if value else "0"
    if value is None or value == "":
        raise ValueError("bottomless setting %s has no value" % name)
    return str(value)


def database_uri(path, **settings):
    """The file: URI that opens path through the bottomless VFS with settings as URI parameters."""
    params = [("vfs", "bottomless")]
    params += [(name, _setting_value(name, value)) for name, value in settings.items() if value is not None]
    # quote() leaves only unreserved characters and '/', so '?', '#', '%' and
    # '&' in a file name or a value cannot end the path or a parameter early.
    query = "&".join(urllib.parse.quote(k, safe="") + "=" + urllib.parse.quote(v, safe="") for k, v in params)
    return "file://" + urllib.parse.quote(os.path.abspath(os.fspath(path)), safe="/") + "?" + query


def connect(path, bucket=None, sync=None, **kwargs):
    """Opens the database at path, replicated by bottomless; returns a sqlite3.Connection.

    bucket, sync and any other keyword named in docs/CONFIG.md (database_id,
    endpoint, batch_interval_ms, initial_replication, ...) become URI
    parameters; sqlite3.connect's own keywords (timeout, isolation_level,
    check_same_thread, ...) go to sqlite3.connect. A setting left at None
    falls back to the LIBSQL_BOTTOMLESS_* environment variable, then to its
    default. The database must use WAL mode to be replicated.
    """
    connect_args = {k: v for k, v in kwargs.items() if k in _SQLITE3_CONNECT_ARGS}
    settings = {k: v for k, v in kwargs.items() if k not in _SQLITE3_CONNECT_ARGS}
    settings = dict(bucket=bucket, sync=sync, **settings)

    # SQLite looks the VFS up when the database opens, so the extension must
    # be loaded first, through a connection of its own (it stays loaded).
    loader = sqlite3.connect(":memory:")
    try:
        load(loader)
    finally:
        loader.close()
    return sqlite3.connect(database_uri(path, **settings), uri=True, **connect_args)
