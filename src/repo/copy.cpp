#include "cbtfs/copy.hpp"

#include <algorithm>
#include <cstring>
#include <future>

#include "cbtfs/errors.hpp"
#include "cbtfs/point_diff.hpp"
#include "cbtfs/point_reader.hpp"
#include "cbtfs/point_writer.hpp"

namespace cbtfs {

namespace {

// dst's point holds what src's does: it was copied from it (or backed up
// from the same snapshot). Anything less sure makes the copy read the whole
// point, which is correct whatever dst holds.
bool same_point(const Manifest& in_src, const Manifest& in_dst) {
  return in_src.time == in_dst.time && in_src.virtual_size == in_dst.virtual_size &&
         in_src.snapshot_uuid == in_dst.snapshot_uuid &&
         (!in_src.blocks_allocated || !in_dst.blocks_allocated || *in_src.blocks_allocated == *in_dst.blocks_allocated);
}

// The blocks of a point that hold data.
std::vector<BlockRun> data_runs(PointReader& r) {
  std::vector<BlockRun> runs;
  for (auto& e : r.data_extents()) {
    uint64_t first = e.offset / kBlockSize, end = (e.offset + e.length + kBlockSize - 1) / kBlockSize;
    runs.push_back({first, end - first});
  }
  return runs;
}

constexpr uint64_t kChunkBlocks = 64;  // 4 MiB read at once

struct Chunk {
  uint64_t first, count;
};

}  // namespace

CopyPlan plan_copy(Repository& src, Repository& dst, const std::string& vdi) {
  CopyPlan plan;
  plan.vdi = vdi;
  auto list = src.points(vdi);
  auto points = list.points;
  std::sort(points.begin(), points.end(), [](auto& a, auto& b) { return a->time < b->time; });
  ManifestPtr have = dst.latest(vdi);
  for (auto& p : points) {
    if (have && p->time <= have->time) {
      ++plan.already;
      if (same_point(*p, *have)) plan.base = p;
    } else {
      plan.points.push_back(p);
    }
  }
  return plan;
}

CopiedPoint copy_point(const std::shared_ptr<Repository>& src, const ManifestPtr& point, const ManifestPtr& base,
                       const std::shared_ptr<Repository>& dst, const std::string& holder,
                       const std::function<void(uint64_t, uint64_t)>& progress) {
  const Manifest& m = *point;
  auto hold = src->hold_point(m);  // a prune of src meanwhile keeps the point until it is copied
  if (!hold) throw UsageError("point " + format_point_name(m.time) + " of VDI " + m.vdi + " was just removed");
  PointInfo info;
  info.time = m.time;
  info.virtual_size = m.virtual_size;
  info.vdi_name = m.vdi_name;
  info.vm_name = m.vm_name;
  info.vm_uuid = m.vm_uuid;
  info.snapshot_uuid = m.snapshot_uuid;
  PointWriter w(dst, m.vdi, info, holder);
  // The point continues dst's chain only where src's continues the chain
  // dst's latest point is a copy of.
  bool delta = base && m.parent != 0 && w.parent() && base->virtual_size == m.virtual_size &&
               same_point(*base, *w.parent());
  if (m.parent == 0 && w.parent())
    w.start_new_chain(m.chain_reason.empty() ? "a new chain in the source repository" : m.chain_reason);

  PointReader reader(src, point, false);
  std::vector<BlockRun> runs = delta ? changed_blocks_between(*src, *base, m) : data_runs(reader);
  std::vector<Chunk> chunks;
  for (auto& r : runs)
    for (uint64_t b = r.first; b < r.first + r.count; b += kChunkBlocks)
      chunks.push_back({b, std::min(kChunkBlocks, r.first + r.count - b)});
  uint64_t total = block_total(runs), done = 0;

  CopiedPoint out;
  auto read_chunk = [&](const Chunk& c) {
    Bytes buf(c.count * kBlockSize);  // the last block of the disk zero-padded
    out.bytes_read += reader.read(c.first * kBlockSize, buf);
    return buf;
  };
  // One chunk is read (decompressed, verified) while the one before is
  // written (hashed, compressed).
  std::future<Bytes> next;
  if (!chunks.empty()) next = std::async(std::launch::async, read_chunk, chunks[0]);
  uint64_t end_of_last = 0;
  for (size_t i = 0; i < chunks.size(); ++i) {
    Bytes buf = next.get();
    if (i + 1 < chunks.size()) next = std::async(std::launch::async, read_chunk, chunks[i + 1]);
    const Chunk& c = chunks[i];
    // Where dst's parent may hold data src's point does not.
    if (!delta) w.put_zeros(end_of_last, c.first);
    for (uint64_t k = 0; k < c.count; ++k) w.put_block(c.first + k, {buf.data() + k * kBlockSize, kBlockSize});
    end_of_last = c.first + c.count;
    done += c.count;
    if (progress) progress(done, total);
  }
  if (!delta) w.put_zeros(end_of_last, w.block_count());
  out.manifest = w.commit();
  out.bytes_stored = w.bytes_written();
  out.records_deduplicated = w.records_deduplicated();
  return out;
}

}  // namespace cbtfs
