// Moves blocks from NBD into a PointWriter: several connections read extents
// in parallel, the writer receives blocks in order through a bounded reorder
// window, so memory stays at a few MiB per connection whatever the disk size.
// Every connection holds a slot of the host's budget while it is open.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "cbtfs/point_writer.hpp"
#include "changed_blocks.hpp"
#include "host_budget.hpp"
#include "nbd/nbd_reader.hpp"

namespace cbtfs::ingest {

struct TransferStats {
  uint64_t bytes_read = 0;  // over NBD
  uint64_t blocks = 0;      // given to the writer
};

// Where one disk is read from: addresses of one host (get_nbd_info's records
// for it), and the run's budget of connections to that host.
struct Source {
  std::vector<nbd::Target> targets;
  nbd::Options opts;
  HostBudget* budget = nullptr;
  std::string host;  // the budget's key for the host
  // How long the first connection waits while the host's NBD server says
  // it is busy (ServerBusy), before the disk fails.
  std::chrono::seconds busy_timeout{900};
  std::function<void(const std::string&)> log;  // may be empty
  // Bytes read and not yet written that the transfer may hold: the run
  // divides its read-ahead among its transfer slots (RunContext).
  size_t read_ahead = 64 << 20;
};

// The budget's key for the host behind a get_nbd_info record: the name its
// certificate gives (the same on every address of one host), else the address.
std::string host_key(const nbd::Target& t);

// Up to `connections` connections, as the budget allows: the first one is
// waited for (slot and server), later ones join while there is work left
// and go when the server is busy. progress gets the bytes of extents
// written so far. Throws nbd::NbdError (or the writer's errors); the writer
// is then left uncommitted, so nothing becomes visible.
TransferStats transfer(const Source& source, int connections, const std::vector<Extent>& extents,
                       uint64_t virtual_size, PointWriter& writer, const std::function<void(uint64_t)>& progress);

}  // namespace cbtfs::ingest
