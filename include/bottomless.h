/*
** bottomless: a SQLite VFS that continuously replicates a database to S3.
**
** Embedding (static library build/libbottomless.a):
**
**     #include <bottomless.h>
**     bottomless_register(0);    // once, before the first open
**     sqlite3_open_v2("file:app.db?vfs=bottomless", &db,
**                     SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_URI, 0);
**
** bottomless_auto_extension() can also be given to sqlite3_auto_extension():
** it registers the VFS and the SQL functions when a connection opens — but
** SQLite resolves "vfs=bottomless" before auto extensions run, so the first
** connection must then be opened without it (e.g. ":memory:").
** Loadable extension (build/bottomless.so): `.load ./bottomless` in the shell.
*/
#ifndef BOTTOMLESS_H
#define BOTTOMLESS_H

#ifdef __cplusplus
extern "C" {
#endif

struct sqlite3;
struct sqlite3_api_routines;

/* Registers the "bottomless" VFS, and the bottomless_* SQL functions on every
** connection opened afterwards. make_default != 0 (or the environment variable
** LIBSQL_BOTTOMLESS_DEFAULT_VFS=1) also makes it the default VFS. Idempotent.
** Returns SQLITE_OK or an SQLite error code. */
int bottomless_register(int make_default);

/* Entry point with the signature sqlite3_auto_extension() expects. */
int bottomless_auto_extension(struct sqlite3* db, char** pzErrMsg, const struct sqlite3_api_routines* pApi);

/* The version string, e.g. "0.1.0". */
const char* bottomless_version(void);

#ifdef __cplusplus
}
#endif

#endif /* BOTTOMLESS_H */
