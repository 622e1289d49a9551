#!/bin/bash
# The NBD export's figure for README.md: nbdcopy of a point from
# `nbdkit cbtfs` against `cp --sparse=always` of the same point from the
# mount. A 1 GiB image, every other MiB random data (about 50 %), one
# point; the packs are read once first so both start from the page cache,
# and each copy is the first read of the point through its path (the
# mount's page cache is cold). One run; root (it mounts).
#   sudo bench/nbdkit.sh [BUILD_DIR]     (default build/)
set -euo pipefail
B=$(realpath "${1:-build}")/src
W=$(mktemp -d /var/tmp/cbtfs-nbdbench.XXXXXX)
VDI=31111111-2222-4333-8444-555555555555
cd "$W"
cleanup() {
  [ -n "${NP:-}" ] && kill "$NP" 2>/dev/null || true
  mountpoint -q mnt && fusermount3 -u mnt || true
  cd / && rm -rf "$W"
}
trap cleanup EXIT
"$B/cbtfs-repo" init r >/dev/null
python3 - <<'PY'
import random
rnd = random.Random(1)
with open("a.img", "wb") as f:
    f.truncate(1 << 30)
    for i in range(0, 1024, 2):
        f.seek(i << 20)
        f.write(rnd.randbytes(1 << 20))
PY
"$B/cbtfs-repo" import -q --vdi $VDI --time 2026-11-24T03:00:00Z r a.img
mkdir mnt
"$B/cbtfs" r mnt
cat r/vdis/*/packs/* >/dev/null
nbdkit -f -U "$W/s.sock" "$B/nbdkit-cbtfs-plugin.so" repo=r vdi=$VDI & NP=$!
for _ in $(seq 100); do [ -S s.sock ] && break; sleep 0.1; done
sync
t0=$(date +%s.%N); nbdcopy "nbd+unix:///?socket=$W/s.sock" o1.img; t1=$(date +%s.%N)
t2=$(date +%s.%N); cp --sparse=always mnt/$VDI/latest.raw o2.img; t3=$(date +%s.%N)
cmp o1.img a.img && cmp o2.img a.img
python3 -c "
a = $t1 - $t0; b = $t3 - $t2; mb = (1 << 30) / 1e6
print(f'nbdcopy from nbdkit cbtfs: {a:.3f} s, {mb / a:.0f} MB/s')
print(f'cp --sparse=always from the mount: {b:.3f} s, {mb / b:.0f} MB/s')
print(f'ratio (nbdcopy / cp): {b / a:.2f}')"
