#!/bin/bash
# Builds the Debian package from the files of the tree that git does not
# ignore (uncommitted edits included), checks it with lintian, and leaves it
# in dist/.
# Needs: apt-get install debhelper lintian (scripts/install-deps.sh has them).
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(cat VERSION)
out=$PWD/dist
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/cbtfs-$version" "$out"
git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$work/cbtfs-$version"
(cd "$work/cbtfs-$version" && dpkg-buildpackage -us -uc -b -j"$(nproc)")
# Every tag lintian still reports is explained in debian/cbtfs.lintian-overrides.
lintian --fail-on error,warning --suppress-tags-from-file /dev/null "$work"/cbtfs_"$version"_*.changes
cp "$work"/cbtfs_"$version"_*.deb "$out/"
ls "$out"/cbtfs_"$version"_*.deb
