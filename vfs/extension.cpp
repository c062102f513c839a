// Entry points of bottomless as a loadable extension (bottomless.so) and as a
// static library (libbottomless.a).
//
// COMPILING: the loadable build defines BOTTOMLESS_LOADABLE_EXTENSION and
// reaches SQLite only through the host's sqlite3_api table; the static build
// defines SQLITE_CORE and calls SQLite directly.
//
// STATUS: this registers the "bottomless" VFS as a pass-through to the
// default VFS. Replication is added by the VFS/replicator work (issue 3).
#ifdef BOTTOMLESS_LOADABLE_EXTENSION
#include <sqlite3ext.h>
SQLITE_EXTENSION_INIT1
#else
#define SQLITE_CORE 1
#include <sqlite3.h>
#endif

#include <cstring>

#include "bottomless.h"

namespace {

sqlite3_vfs g_vfs;  // a copy of the default VFS under our name

int register_vfs(int make_default) {
    if (sqlite3_vfs* existing = sqlite3_vfs_find("bottomless")) {
        return make_default ? sqlite3_vfs_register(existing, 1) : SQLITE_OK;
    }
    sqlite3_vfs* lower = sqlite3_vfs_find(nullptr);
    if (!lower) return SQLITE_ERROR;
    std::memcpy(&g_vfs, lower, sizeof g_vfs);
    g_vfs.pNext = nullptr;
    g_vfs.zName = "bottomless";
    return sqlite3_vfs_register(&g_vfs, make_default);
}

}  // namespace

extern "C" {

int bottomless_register(int make_default) { return register_vfs(make_default); }

int bottomless_auto_extension(sqlite3*, char**, const sqlite3_api_routines*) { return register_vfs(0); }

const char* bottomless_version(void) { return BOTTOMLESS_VERSION; }

#ifdef BOTTOMLESS_LOADABLE_EXTENSION
__attribute__((visibility("default"))) int sqlite3_bottomless_init(sqlite3* db, char** pzErrMsg,
                                                                   const sqlite3_api_routines* pApi) {
    (void)db;
    (void)pzErrMsg;
    SQLITE_EXTENSION_INIT2(pApi);
    int rc = register_vfs(0);
    return rc == SQLITE_OK ? SQLITE_OK_LOAD_PERMANENTLY : rc;
}
#endif

}  // extern "C"
