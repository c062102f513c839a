// Per-thread state of the S3 client (a caller's deadline, retry jitter).
//
// The initial-exec TLS model: the few bytes live in the static TLS block,
// even in bottomless.so loaded with dlopen (glibc keeps spare room there for
// that), so reaching them is one instruction instead of a __tls_get_addr
// call, and no dynamic TLS block is allocated per thread. It also keeps
// LeakSanitizer working: with dynamic TLS allocated through ASan's malloc,
// GCC 12's LeakSanitizer misreads the block's size (a glibc >= 2.19
// heuristic, "tls={0x82c ...}") and its tracer crashes at exit in any
// process that loaded the extension and used the client on its main thread.
#pragma once

#define BOTTOMLESS_THREAD_LOCAL thread_local __attribute__((tls_model("initial-exec")))
