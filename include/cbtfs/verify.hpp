// Full verification of a VDI: every manifest, every index node, every stored
// block, every checksum. Shared records are read once; a bad one is reported
// for each point that needs it.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "cbtfs/repository.hpp"

namespace cbtfs {

struct VerifyReport {
  uint64_t points = 0;
  uint64_t nodes = 0;
  uint64_t blocks = 0;
  uint64_t bytes_read = 0;
  std::vector<std::string> problems;  // each names the VDI, point and block
  std::vector<std::string> warnings;  // harmless leftovers
};

VerifyReport verify_vdi(Repository& repo, const std::string& vdi, const std::function<void(uint64_t)>& progress = {});

// What can be checked of a format 2 repository without its key (verify
// --stored-only): every manifest, every index segment's pages, every pack's
// header, and every record's stored bytes against the checksum its
// reference keeps. Records are found through the dedup index, since the
// references inside points are sealed; after a collection it lists every
// record a point needs. Nothing is decrypted, so nothing says the
// plaintext is right: the full verify, with the key, does.
struct StoredReport {
  uint64_t manifests = 0, segments = 0, packs = 0, records = 0, bytes_read = 0;
  // Records stored before stored checksums existed: found where their
  // references say, not checked.
  uint64_t unrecorded = 0;
  // Encrypted manifests without the frame that holds their stored
  // checksum: sealed by the first encrypted repositories, or damaged in
  // their first bytes; the full verify, with the key, tells which.
  uint64_t unframed = 0;
  std::vector<std::string> problems;
  std::vector<std::string> warnings;
};
StoredReport verify_stored(Repository& repo, const std::function<void(uint64_t)>& progress = {});

}  // namespace cbtfs
