# A ctest entry that proves every Catch2 test case is also a ctest entry.
#
# Catch2 v2's catch_discover_tests splits a test name at ';' (one case became
# two entries that each matched nothing and passed), and a test binary given a
# filter that matches nothing exits 0. The entries run with `-w NoTests` so the
# second cannot pass any more; this check catches the first: for each binary
# it compares the names `--list-test-names-only` prints with the names the
# ctest entries running that binary pass to it, and fails on any difference.
#
#   cmake -DCTEST=ctest -DBUILD_DIR=build "-DBINARIES=a|b|c" -P check_discovery.cmake

cmake_minimum_required(VERSION 3.19)

string(REPLACE "|" ";" binaries "${BINARIES}")
execute_process(COMMAND "${CTEST}" --test-dir "${BUILD_DIR}" --show-only=json-v1
  OUTPUT_VARIABLE json RESULT_VARIABLE rc ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "ctest --show-only failed (${rc}): ${err}")
endif()

# The arguments each ctest entry passes to each binary.
string(JSON n_tests LENGTH "${json}" tests)
math(EXPR last "${n_tests} - 1")
foreach(i RANGE 0 ${last})
  string(JSON n_cmd ERROR_VARIABLE no_cmd LENGTH "${json}" tests ${i} command)
  if(no_cmd OR n_cmd LESS 2)
    continue()
  endif()
  string(JSON exe GET "${json}" tests ${i} command 0)
  string(JSON arg GET "${json}" tests ${i} command 1)
  # CatchAddTests escapes these three for Catch's test-spec parser.
  foreach(char , [ ])
    string(REPLACE "\\${char}" "${char}" arg "${arg}")
  endforeach()
  string(MD5 key "${exe}")
  string(JSON name GET "${json}" tests ${i} name)
  # '|' stands for ';' inside the per-binary lists: a ';' in a name is exactly
  # what this check must see rather than have CMake split.
  string(REPLACE ";" "|" arg "${arg}")
  list(APPEND ctest_${key} "${arg}")
endforeach()

set(failed 0)
set(total 0)
foreach(exe IN LISTS binaries)
  execute_process(COMMAND "${exe}" --list-test-names-only
    OUTPUT_VARIABLE out RESULT_VARIABLE rc)
  if(NOT rc GREATER 0)
    message(SEND_ERROR "${exe} --list-test-names-only lists no test (exit ${rc})")
    set(failed 1)
    continue()
  endif()
  string(REPLACE ";" "|" out "${out}")
  string(REPLACE "\n" ";" names "${out}")
  list(FILTER names EXCLUDE REGEX "^$")
  string(MD5 key "${exe}")
  set(entries ${ctest_${key}})
  list(LENGTH names n_catch)
  list(LENGTH entries n_ctest)
  math(EXPR total "${total} + ${n_catch}")
  set(missing ${names})
  if(entries)
    list(REMOVE_ITEM missing ${entries})
  endif()
  set(extra ${entries})
  if(names)
    list(REMOVE_ITEM extra ${names})
  endif()
  if(NOT n_catch EQUAL n_ctest OR missing OR extra)
    set(failed 1)
    list(JOIN missing "\n    " missing)
    list(JOIN extra "\n    " extra)
    message(SEND_ERROR "${exe}: ${n_catch} Catch2 test cases, ${n_ctest} ctest entries\n"
      "  test cases ctest never runs:\n    ${missing}\n"
      "  ctest entries that are not a test case:\n    ${extra}\n"
      "  (a ';' in a TEST_CASE name, shown here as '|', splits it; rename it)")
  else()
    message(STATUS "${exe}: ${n_catch} test cases = ${n_ctest} ctest entries")
  endif()
endforeach()
if(failed)
  message(FATAL_ERROR "ctest does not run every Catch2 test case exactly once")
endif()
message(STATUS "all ${total} Catch2 test cases are ctest entries")
