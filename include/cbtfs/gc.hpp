// Collection of a format 2 repository's block store: frees the records that
// no point of any VDI references, while other VDIs are being written and
// while points are read.
//
// One collection at a time (store/gc/lock). It marks itself as freeing
// (store/gc/sweeping), lists the packs, reads every writer's uses/ names
// (packs a live writer relies on are left alone this time; a writer whose
// VDI lock is free is dead and its names are void), then walks every point
// of every VDI, and only then frees. First the dedup index: the segments of
// the packs it judges (and earlier merged ones) are merged into one that
// lists only live records; then a pack with no live record is removed, and
// in one with some the dead records' bytes are punched out where the
// storage can (a local directory). Where it cannot (S3), a pack at least a
// fifth dead is rewritten with its live records only, behind a table from
// their old offsets, so that no reference changes (repacked_pack.hpp).
// The order is what keeps it safe: see store_writer.hpp for the writer's half.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "cbtfs/repository.hpp"

namespace cbtfs {

struct GcReport {
  uint64_t packs = 0;            // in the store when it started
  uint64_t packs_in_use = 0;     // left alone: a running writer relies on them
  uint64_t packs_removed = 0;
  uint64_t live_records = 0;
  uint64_t bytes_freed = 0;
  uint64_t bytes_dead = 0;       // no longer needed but still allocated (pieces of file-system blocks, S3 packs
                                 // not worth rewriting yet)
  uint64_t packs_rewritten = 0;  // S3: partly dead packs copied without their dead records
  uint64_t bytes_rewritten = 0;  // the live bytes those copies read and wrote
  uint64_t unfinished_dropped = 0;  // half-written packs and segments of writers that died
  uint64_t index_segments = 0;   // merged into one (when any record died, or there were many)
  uint64_t index_entries = 0;    // in the merged segment
};

// Throws UsageError on a format 1 repository, LockedError when another
// collection runs, FormatError when a manifest cannot be read (a point it
// cannot see might need any record, so nothing is freed).
GcReport collect_store(Repository& repo, bool dry_run, const std::string& holder);

// Merges the index segments writers made since the last collection (one
// per pack) into one when there are more than 32 of them: a lookup reads a
// page of every segment, and a large first backup makes thousands. Run by
// the commands that write points, after they committed. Best effort: it
// does nothing while a collection holds the store (which merges everything
// itself), and returns how many segments it merged.
size_t merge_index_segments(Repository& repo, const std::string& holder);

}  // namespace cbtfs
