// SQLite for code shared by the CLI and the extension. Inside the loadable
// extension (BOTTOMLESS_LOADABLE_EXTENSION) every call goes through the
// host's sqlite3_api table: a second SQLite in one process would break POSIX
// locking. Elsewhere SQLite is linked as usual.
#pragma once

#ifdef BOTTOMLESS_LOADABLE_EXTENSION
#include <sqlite3ext.h>
SQLITE_EXTENSION_INIT3
#else
#include <sqlite3.h>
#endif
