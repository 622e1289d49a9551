#!/bin/bash
# Installs the package that build-deb.sh left in dist/, uses it from PATH as
# an admin would (init, import, mount -t fuse.cbtfs, an fstab line, man),
# removes it, and checks that nothing of it is left. Changes this machine:
# run it as root on a machine without cbtfs installed (CI).
set -euo pipefail
cd "$(dirname "$0")/.."
deb=$(realpath dist/cbtfs_"$(cat VERSION)"_*.deb)
fail() { echo "package smoke test: $*" >&2; exit 1; }

dpkg -s cbtfs >/dev/null 2>&1 && fail "cbtfs is installed already; this test installs and removes it"
for d in /usr/local/sbin /usr/local/bin; do
  [ -e "$d/cbtfs" ] && fail "$d/cbtfs would be found before the package's /usr/bin/cbtfs"
done

work=$(mktemp -d)
cp /etc/fstab "$work/fstab.orig"
cleanup() {
  hash -r  # a command the package took away must not be run from bash's memory of it
  if [ -d "$work/view" ] && command -v cbtfs-browse >/dev/null; then cbtfs-browse -u "$work/view" >/dev/null 2>&1 || true; fi
  mountpoint -q "$work/mnt" && umount -l "$work/mnt"
  cp "$work/fstab.orig" /etc/fstab
  dpkg -s cbtfs >/dev/null 2>&1 && dpkg -r cbtfs >/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

echo "== install $deb"
apt-get install -y -qq "$deb" >/dev/null
dpkg -L cbtfs > "$work/files"
[ "$(command -v cbtfs)" = /usr/bin/cbtfs ] || fail "cbtfs is not /usr/bin/cbtfs in PATH: $(command -v cbtfs)"

echo "== init, import, mount -t fuse.cbtfs"
vdi=5a0c7f3e-2b1d-4c6e-8f9a-0d1e2f3a4b5c
cd "$work"
cbtfs-repo init repo
head -c 3000000 /dev/urandom > disk.img
truncate -s 64M disk.img
cbtfs-repo import -q --vdi "$vdi" --time 2026-11-30T010000Z repo disk.img
mkdir mnt
mount -t fuse.cbtfs "$work/repo" "$work/mnt"
ls -l "mnt/$vdi/"
cmp "mnt/$vdi/latest.raw" disk.img
umount "$work/mnt"

echo "== an fstab line, mount MNT"
echo "$work/repo $work/mnt fuse.cbtfs ro,noauto,allow_other 0 0" >> /etc/fstab
mount "$work/mnt"
grep -q " $work/mnt fuse.cbtfs " /proc/mounts || fail "the fstab mount is not there"
cmp "mnt/$vdi/2026-11-30T010000Z.raw" disk.img
umount "$work/mnt"
cp "$work/fstab.orig" /etc/fstab

echo "== cbtfs-browse from PATH: a file of a whole-disk ext4"
mkdir content view
echo "restored from a point" > content/hello.txt
mkfs.ext4 -q -F -d content fs.img 16M
cbtfs-repo import -q --vdi "$vdi" --time 2026-11-30T020000Z repo fs.img
cbtfs-browse "$work/repo" "$vdi" latest "$work/view"
cmp view/disk/hello.txt content/hello.txt
cbtfs-browse -u "$work/view"
mountpoint -q "$work/view" && fail "cbtfs-browse -u left $work/view mounted"

echo "== man pages"
for page in cbtfs cbtfs-browse cbtfs-repo cbtfs-ingest "5 cbtfs-format" "7 cbtfs-s3"; do
  # shellcheck disable=SC2086
  man -P cat $page 2>/dev/null | grep -q . || fail "man $page shows nothing"
done

echo "== systemd units"
unitdir=$(pkg-config --variable=systemdsystemunitdir systemd 2>/dev/null || echo /lib/systemd/system)
for u in "cbtfs-ingest@.service" "cbtfs-ingest@.timer"; do
  grep -qx "$unitdir/$u" "$work/files" || fail "$unitdir/$u is not in the package"
done
grep -q '^ExecStart=/usr/bin/cbtfs-ingest ' "$unitdir/cbtfs-ingest@.service" || fail "the service does not run /usr/bin/cbtfs-ingest"
# An instance of each, as the admin enables them; Documentation= is checked against the installed man page.
out=$(systemd-analyze verify cbtfs-ingest@smoke.service cbtfs-ingest@smoke.timer 2>&1) || fail "systemd-analyze verify: $out"
[ -z "$out" ] || fail "systemd-analyze verify warns: $out"

echo "== remove"
dpkg -r cbtfs >/dev/null
status=$(dpkg-query -W -f='${db:Status-Abbrev}' cbtfs 2>/dev/null || true)
case "$status" in "" | "un "*) ;; *) fail "after dpkg -r the package's status is '$status'" ;; esac
while read -r f; do
  [ -d "$f" ] && continue
  [ -e "$f" ] && fail "$f is still there after dpkg -r"
done < "$work/files"
hash -r
for c in cbtfs cbtfs-repo cbtfs-ingest cbtfs-browse; do
  command -v "$c" >/dev/null && fail "$c is still in PATH after dpkg -r"
done
echo "package smoke test: OK"
