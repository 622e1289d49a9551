// LVM2 volume groups on the devices of a disk image (the whole disk and its
// partitions): the PV labels, the text metadata in their metadata areas,
// and the mapping of a logical volume's bytes onto the devices. Only linear
// and striped LVs whose PVs are all on these devices are mapped; every
// other LV is reported with the reason, never guessed at. Everything read
// is data from the guest, so nothing is trusted: sizes, offsets, counts,
// nesting and names are checked, arithmetic cannot overflow. No FUSE, no
// repository, no device-mapper.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "partitions.hpp"  // DiskReader

namespace cbtfs::lvm {

// One device to look for a PV on: reads stay within [0, size).
struct Device {
  DiskReader read;
  uint64_t size = 0;
};

struct PhysicalVolume {
  std::string name, uuid;  // "pv0", the uuid as LVM prints it
  uint32_t device = 0;     // index into the devices scanned
  uint64_t pe_start = 0;   // bytes from the device's start
  uint64_t pe_count = 0;
};

struct Stripe {
  uint32_t pv = 0;  // index into VolumeGroup::pvs
  uint64_t start_pe = 0;
};

struct Segment {
  uint64_t start_extent = 0, extent_count = 0;
  uint64_t stripe_size = 0;  // bytes; 0 when linear
  std::vector<Stripe> stripes;
};

struct LogicalVolume {
  std::string name, uuid;
  uint64_t size = 0;  // bytes
  std::vector<Segment> segments;  // sorted, contiguous from extent 0
};

// An LV not shown, and why ("thin volume (not supported)").
struct Skipped {
  std::string lv, reason;
};

struct VolumeGroup {
  std::string name, uuid;
  uint64_t seqno = 0;
  uint64_t extent_size = 0;  // bytes
  bool recovered = false;    // the newest metadata failed its checksum: an older copy was used
  std::vector<PhysicalVolume> pvs;  // those found on the devices
  std::vector<LogicalVolume> lvs;   // those that can be mapped
  std::vector<Skipped> skipped;
};

struct Scan {
  std::vector<VolumeGroup> groups;  // ordered by name, then uuid
  std::vector<std::string> notes;   // problems not tied to one LV
};

// Finds the PVs on the devices and the newest valid metadata of each VG.
// Throws only what a read throws.
Scan find_volume_groups(const std::vector<Device>& devices);

// One contiguous piece of an LV on a device.
struct Piece {
  uint64_t lv_offset = 0, length = 0;
  uint32_t device = 0;
  uint64_t device_offset = 0;
};

// The pieces of [offset, offset + length) of the LV (clipped to its size),
// in order, at most max_pieces of them (then the rest is not mapped).
std::vector<Piece> map_lv(const VolumeGroup& vg, const LogicalVolume& lv, uint64_t offset, uint64_t length,
                          size_t max_pieces = 1u << 16);

// The device ranges that hold the LV's data, one per stripe of a segment
// (lv_offset: where the segment starts).
std::vector<Piece> lv_areas(const VolumeGroup& vg, const LogicalVolume& lv);

// "segments" attribute: one "start+count:pv0@pe[,pv1@pe]" per segment, in extents.
std::string describe_segments(const VolumeGroup& vg, const LogicalVolume& lv);

// The CRC LVM2 puts in its labels and metadata: CRC-32 (reflected,
// 0xedb88320) from 0xf597a6cf, without the final inversion.
constexpr uint32_t kInitialCrc = 0xf597a6cf;
uint32_t crc(uint32_t crc, std::span<const std::byte> data);

// Limits on hostile metadata.
constexpr uint64_t kMaxText = 8u << 20;      // one metadata copy
constexpr size_t kMaxNodes = 500000;         // values and sections in one copy
constexpr int kMaxDepth = 16;
constexpr size_t kMaxPvs = 1024, kMaxLvs = 10000, kMaxSegments = 100000, kMaxStripes = 128;

}  // namespace cbtfs::lvm
