#!/bin/bash
# Builds the libFuzzer targets with clang, ASan and UBSan, and runs each for
# SECONDS (default 30) from its committed seed corpus. Exit non-zero on the
# first crash; the crashing input is left in build-fuzz/.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-30}
[ -f build-fuzz/build.ninja ] || CC=clang CXX=clang++ meson setup build-fuzz -Dfuzz=true -Dtests=false \
  -Db_sanitize=address,undefined -Db_lundef=false -Dnbdkit_plugin=disabled -Dman=false
targets="manifest record partitions lvm lvm-nocrc xmlrpc bitmap"
# Only the fuzzers: the commands built with clang would only cost CI minutes.
meson compile -C build-fuzz $(for t in $targets; do echo tests/fuzz/fuzz-$t; done)
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
for t in $targets; do
  work=$(mktemp -d)
  cp tests/fuzz/corpus/${t%-nocrc}/* "$work"/
  (cd build-fuzz && ./tests/fuzz/fuzz-$t -max_total_time="$seconds" -print_final_stats=1 "$work" 2>&1) |
    grep -E "stat::number_of_executed_units|ERROR|SUMMARY" | sed "s/^/fuzz-$t: /"
  rm -rf "$work"
done
