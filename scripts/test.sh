#!/bin/bash
# Builds cbtfs (if needed) and runs the whole test suite; as root, since the
# integration tests mount for real. Extra arguments go to "meson setup".
# BUILD=dir picks the build directory (default: build); TEST_ARGS adds
# arguments to "meson test" (e.g. --suite integration); BUILD_TARGETS builds
# only those targets (what the tests named in TEST_ARGS run).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${BUILD:-build}
[ -f "$build/build.ninja" ] || meson setup "$build" "$@"
rc=0
if [ -n "${BUILD_TARGETS:-}" ]; then
  # Only what the chosen tests run (a sanitizer stage): meson test would otherwise build everything.
  meson compile -C "$build" $BUILD_TARGETS
  meson test -C "$build" --no-rebuild --print-errorlogs ${TEST_ARGS:-} || rc=$?
else
  meson compile -C "$build"
  meson test -C "$build" --print-errorlogs ${TEST_ARGS:-} || rc=$?
fi
# One closing line that any CI reads the same way.
/usr/bin/python3 - "$build/meson-logs/testlog.json" <<'PY'
import json, sys
res = [json.loads(l)["result"] for l in open(sys.argv[1]) if l.strip()]
ok = sum(r == "OK" for r in res)
skip = sum(r == "SKIP" for r in res)
print(f"{ok} passed, {len(res) - ok - skip} failed, {skip} skipped")
PY
exit $rc
