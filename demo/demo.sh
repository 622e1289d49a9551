#!/bin/bash
# The cbtfs demo: a disk with a GPT and an ext4 file system goes through three
# states, each is imported as a point, and the repository is mounted.
# Usage: demo/demo.sh [WORKDIR]   (root: it uses loop and FUSE mounts)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
build=${CBTFS_BUILD:-$here/build}
work=${1:-/tmp/cbtfs-demo}
repo_tool=$build/src/cbtfs-repo
cbtfs=$build/src/cbtfs
vdi=3c5a7d1e-9b2f-4e6a-8d0c-1f2e3a4b5c6d
[ -x "$repo_tool" ] || { echo "build first: meson setup build && meson compile -C build" >&2; exit 1; }

if mountpoint -q "$work/mnt" 2>/dev/null; then fusermount3 -u "$work/mnt"; fi
rm -rf "$work" && mkdir -p "$work/mnt" "$work/fs"
cd "$work"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "a 256 MiB disk: GPT, one partition at 1 MiB, ext4"
truncate -s 256M disk.img
sgdisk -q -n 1:2048:0 -t 1:8300 disk.img
off=$((2048 * 512))
mkfs.ext4 -q -F -E offset=$off disk.img $(( (256 - 1) * 1024 - 64 ))k
guest() { mount -o loop,offset=$off disk.img fs && "$@"; umount fs; }

day() { date -u -d "$1 days ago" +%Y-%m-%dT03:00:00Z; }

step "state 1: some files; imported as the full base"
guest sh -c 'echo "Monday report" > fs/report.txt; head -c 20M /dev/urandom > fs/data.bin; cp -r /usr/share/doc/e2fsprogs fs/docs'
cp --sparse=always disk.img state1.img
"$repo_tool" init repo
"$repo_tool" import --vdi $vdi --vm-name "demo vm" --vdi-name "system disk" --time "$(day 2)" repo disk.img

step "state 2: a file changed, one deleted; imported as a delta"
guest sh -c 'echo "Tuesday report" > fs/report.txt; rm -r fs/docs'
cp --sparse=always disk.img state2.img
"$repo_tool" import --vdi $vdi --time "$(day 1)" repo disk.img

step "state 3: 1 MiB of the big file rewritten; another delta"
guest sh -c 'dd if=/dev/urandom of=fs/data.bin bs=1M count=1 seek=5 conv=notrunc status=none; echo "Wednesday report" > fs/report.txt'
cp --sparse=always disk.img state3.img
"$repo_tool" import --vdi $vdi --time "$(day 0)" repo disk.img

step "cbtfs-repo ls"
"$repo_tool" ls repo
"$repo_tool" verify repo

step "mount: cbtfs repo mnt"
"$cbtfs" repo mnt
ls -l mnt mnt/$vdi mnt/by-name/*
i=1
for img in mnt/$vdi/2*.raw; do
  cmp "$img" state$i.img && echo "cmp $img state$i.img: identical"
  i=$((i + 1))
done
first=$(ls mnt/$vdi/2*.raw | head -1)
mkdir -p old && mount -o loop,ro,offset=$off "$first" old
echo "report.txt in the oldest point: $(cat old/report.txt)"
umount old

cat <<MSG

The repository is mounted at $work/mnt. Try:
  ls -l $work/mnt/by-name/*/
  cmp $work/mnt/$vdi/latest.raw $work/state3.img
  mount -o loop,ro,offset=$off $work/mnt/$vdi/latest.raw /mnt
  getfattr -d $work/mnt/$vdi/latest.raw
Unmount with: fusermount3 -u $work/mnt
MSG
