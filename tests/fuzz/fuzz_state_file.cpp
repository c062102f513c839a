// Fuzzes the local state file reader ("<database>-bottomless",
// replicator/state_file.h), read at every start: the file may be truncated
// by a crash, stale, or edited by hand.
//
// Input: the file's text.
#include <cstdint>
#include <string>

#include "fuzz_common.h"
#include "replicator/state_file.h"

using namespace bottomless;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    fuzz::quiet_logs();
    (void)replicator::parse_state_file(fuzz::as_view(data, size), "fuzz/db-bottomless");
    return 0;
}
