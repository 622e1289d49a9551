// A new VDI filled from a byte stream: VDI.create, then one HTTP PUT to
// /import_raw_vdi (XAPI's raw import, the same handler xe vdi-import uses).
// The handler answers 200 before it has read the body: only the task it is
// given (task_id) says whether the data landed.
//
// Two bodies: format=raw, every byte of the disk; or format=raw&chunked=true,
// only the extents given, each as chunks of a 12-byte header {offset: uint64
// LE, length: uint32 LE} and the data, ended by the chunk {0, 0} (xen-api's
// vhd-tool, chunked.ml). The chunked body suits a new VDI that reads as
// zeros: only what is written changes. XAPI refuses any HTTP transfer
// encoding, so both go with a Content-Length, and with Expect: 100-continue,
// so that a host that cannot see the SR answers its 302 before the body
// goes; the upload follows the 302 (query kept) to the host that can.
//
// Knows XAPI, not where the bytes come from: the caller hands a source.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <stdexcept>
#include <string>

#include "client.hpp"

namespace cbtfs::xapi {

// The import failed outside any XAPI call: the connection, the handler's
// HTTP answer, or a task that did not end in time or vanished.
class ImportError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct NewVdi {
  std::string sr_uuid;
  std::string name, description;
  uint64_t virtual_size = 0;
};

// An empty, writable, unshared user disk in the SR; returns its ref.
std::string create_vdi(Client& c, const NewVdi& vdi);

struct VdiRecord {
  std::string uuid;
  uint64_t virtual_size = 0;  // may exceed what was asked for: the host rounds up
};
VdiRecord get_vdi_record(Client& c, const std::string& ref);

// VDI.destroy, once: a VDI left half filled must not stay behind.
void destroy_vdi(Client& c, const std::string& ref);

// Fills out with the bytes at offset and returns how many (the disk's bytes
// in order, up to the size given to import_raw_vdi). What it throws aborts
// the upload and comes out of import_raw_vdi unchanged.
using ImportSource = std::function<size_t(uint64_t offset, std::span<std::byte> out)>;

// Streams size bytes from source into the VDI and waits (the client's
// timeout) for the import's task to say it landed. A failed import throws
// ImportError, or XapiError with the task's error; its task is cancelled and
// destroyed, the VDI left to the caller. The upload goes to the host the
// client's calls go to (url(): the pool master when login was sent there),
// or where its 302 sends it.
void import_raw_vdi(Client& c, const std::string& vdi_ref, uint64_t size, const ImportSource& source);

// [offset, offset + length) of the disk.
struct Extent {
  uint64_t offset = 0, length = 0;
};

// The most data one chunk carries: extents are cut into chunks this long.
inline constexpr uint64_t kMaxChunk = 4u << 20;
inline constexpr uint64_t kChunkHeader = 12;  // offset (8) and length (4)

// The chunked body's length for these extents: their data, a header per
// chunk and the last chunk.
uint64_t chunked_body_size(std::span<const Extent> extents);

// As import_raw_vdi, but sends only the extents (ascending, not
// overlapping, inside the VDI); source is asked for their bytes alone. The
// rest of the VDI keeps what it holds: zeros in a new VDI, except on SRs
// that do not zero new disks (XAPI's must_write_zeroes_into_new_vdi: thick
// LVM with raw VDIs, EqualLogic thick, StorageLink), which need the full raw
// import.
void import_raw_vdi_sparse(Client& c, const std::string& vdi_ref, std::span<const Extent> extents,
                           const ImportSource& source);

}  // namespace cbtfs::xapi
