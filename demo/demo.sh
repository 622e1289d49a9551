#!/bin/bash
# The cbtfs demo: a simulated XenServer (tests/xapi_sim) with a VM whose two
# disks hold ext4 file systems; three nightly backups with cbtfs-ingest and
# guest writes in between; then the repository mounted with cbtfs.
# Usage: demo/demo.sh [WORKDIR]   (as root: it uses loop and FUSE mounts)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
build=${CBTFS_BUILD:-$here/build}
work=${1:-/tmp/cbtfs-demo}
bin=$build/src

if [ ! -x "$bin/cbtfs-ingest" ]; then
  [ -f "$build/build.ninja" ] || meson setup "$build" "$here" >/dev/null
  meson compile -C "$build" >/dev/null
fi
if mountpoint -q "$work/mnt" 2>/dev/null; then fusermount3 -u "$work/mnt"; fi
rm -rf "$work" && mkdir -p "$work/mnt" "$work/fs" "$work/expect"
cd "$work"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "a simulated XenServer: VM 'demo-vm' with a 256 MiB system disk and a 64 MiB data disk"
cat > sim.json <<'JSON'
{"user": "root", "password": "demo-password", "nbd": "tls",
 "vms": [{"name": "demo-vm", "cd": true,
          "disks": [{"name": "system", "size": 268435456}, {"name": "data", "size": 67108864}]}]}
JSON
/usr/bin/python3 "$here/tests/xapi_sim/xapi_sim.py" --state-dir sim --config sim.json 2>sim.log &
sim_pid=$!
trap 'kill $sim_pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -f sim/ready.json ] && break; sleep 0.1; done
field() { /usr/bin/python3 -c "import json,sys; print(json.load(open('sim/ready.json'))['$1'])"; }
url=$(field url); ca=$(field ca_file); control=$(field control)
disk() { /usr/bin/python3 -c "
import json, urllib.request
s = json.load(urllib.request.urlopen('$control/state'))
print(next(v['$2'] for v in s['vdis'] if v['name'] == '$1' and not v['is_a_snapshot']))"; }
system=$(disk system path); data=$(disk data path)
echo "XAPI at $url (TLS, CA $ca); NBD served by nbdkit with TLS"

off=$((2048 * 512))
sgdisk -n 1:2048:0 -t 1:8300 "$system" >/dev/null
mkfs.ext4 -q -F -E offset=$off,nodiscard "$system" $(( 255 * 1024 - 64 ))k  # discard would wipe the GPT
mkfs.ext4 -q -F "$data"
guest() {  # runs a command with the VM's file systems mounted at fs/system and fs/data
  mkdir -p fs/system fs/data
  mount -o loop,offset=$off "$system" fs/system
  mount -o loop "$data" fs/data
  "$@"
  umount fs/system fs/data
}
keep() { cp --sparse=always "$system" "expect/system-$1.img"; cp --sparse=always "$data" "expect/data-$1.img"; }
echo demo-password > password && chmod 600 password
ingest() { "$bin/cbtfs-ingest" --xapi "$url" --ca-file "$ca" --password-file password --vm demo-vm repo; }
"$bin/cbtfs-repo" init repo >/dev/null

step "night 1: files written; the first backup is a full one"
guest sh -c 'echo "Monday report" > fs/system/report.txt; head -c 20M /dev/urandom > fs/data/db.bin; cp -r /usr/share/doc/e2fsprogs fs/system/docs'
ingest; keep 1

step "night 2: a file changed, a directory deleted; only changed blocks travel"
sleep 1
guest sh -c 'echo "Tuesday report" > fs/system/report.txt; rm -r fs/system/docs'
ingest; keep 2

step "night 3: 1 MiB of the database rewritten"
sleep 1
guest sh -c 'dd if=/dev/urandom of=fs/data/db.bin bs=1M count=1 seek=5 conv=notrunc status=none; echo "Wednesday report" > fs/system/report.txt'
ingest; keep 3

step "cbtfs-repo ls"
"$bin/cbtfs-repo" ls repo
echo "left on the host: one metadata-only snapshot per disk:"
/usr/bin/python3 -c "
import json, urllib.request
for v in json.load(urllib.request.urlopen('$control/state'))['vdis']:
    if v['is_a_snapshot']: print('  ', v['uuid'], v['type'], v['name'])"

step "mount: cbtfs repo mnt"
"$bin/cbtfs" repo mnt
ls -l mnt/by-name/demo-vm/
for name in system data; do
  uuid=$(disk $name uuid)
  i=1
  for img in mnt/$uuid/2*Z.raw; do
    cmp "$img" "expect/$name-$i.img" && echo "cmp $img expect/$name-$i.img: identical"
    i=$((i + 1))
  done
done
uuid=$(disk system uuid)
first=$(ls mnt/$uuid/2*Z-part1.raw | head -1)
mkdir -p old && mount -o loop,ro "$first" old
echo "report.txt in the oldest backup of the system disk: $(cat old/report.txt)"
umount old

cat <<MSG

The repository is mounted at $work/mnt (the simulated host has been stopped). Try:
  ls -l $work/mnt/by-name/demo-vm/
  cmp $work/mnt/$uuid/latest.raw $work/expect/system-3.img
  mount -o loop,ro $work/mnt/$uuid/${first##*/} /mnt        (a partition, as a file)
  getfattr -d $work/mnt/$uuid/latest.raw
Unmount with: fusermount3 -u $work/mnt
MSG
