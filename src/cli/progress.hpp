// A progress line for long work: bytes, rate and ETA, redrawn on a terminal,
// silent otherwise (log files get the summary line the command prints).
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

#include "cbtfs/human_bytes.hpp"

namespace cbtfs {

class Progress {
 public:
  Progress(std::string label, uint64_t total);
  ~Progress();
  void update(uint64_t done);
  void set_total(uint64_t total) { total_ = total; }
  void finish();

 private:
  std::string label_;
  uint64_t total_;
  bool tty_;
  bool drawn_ = false;
  std::chrono::steady_clock::time_point start_, last_;
};

}  // namespace cbtfs
