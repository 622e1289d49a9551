// A new VDI filled from a byte stream: VDI.create, then one HTTP PUT to
// /import_raw_vdi (XAPI's raw import, the same handler xe vdi-import uses).
// The handler answers 200 before it has read the body: only the task it is
// given (task_id) says whether the data landed.
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
// destroyed, the VDI left to the caller.
void import_raw_vdi(Client& c, const std::string& vdi_ref, uint64_t size, const ImportSource& source);

}  // namespace cbtfs::xapi
