#!/bin/sh
# Installs what cbtfs needs to build, test and run its demo on Debian 12.
# Run as root. Every package is from Debian's archive; README.md says why each is there.
set -eu
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
  build-essential g++ meson ninja-build pkg-config git \
  libfuse3-dev fuse3 liblz4-dev libxxhash-dev nlohmann-json3-dev libcli11-dev \
  libcurl4-openssl-dev libpugixml-dev libnbd-dev libssl-dev libgcrypt20-dev \
  catch2 python3 python3-pytest nbdkit nbdkit-plugin-dev libnbd-bin python3-libnbd qemu-utils openssl \
  gdisk fdisk dosfstools e2fsprogs xfsprogs lvm2 btrfs-progs ntfs-3g cryptsetup-bin util-linux attr kmod time clang libclang-rt-14-dev \
  ceph-mon ceph-osd radosgw ceph-common python3-boto3 \
  debhelper lintian man-db systemd \
  >/dev/null
