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

}  // namespace cbtfs
