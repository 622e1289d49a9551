#include "progress.hpp"

#include <unistd.h>

#include <cstdio>

namespace cbtfs {

Progress::Progress(std::string label, uint64_t total)
    : label_(std::move(label)), total_(total), tty_(isatty(STDERR_FILENO)), start_(std::chrono::steady_clock::now()), last_(start_) {}

Progress::~Progress() { finish(); }

void Progress::update(uint64_t done) {
  if (!tty_) return;
  auto now = std::chrono::steady_clock::now();
  if (now - last_ < std::chrono::milliseconds(200)) return;
  last_ = now;
  double secs = std::chrono::duration<double>(now - start_).count();
  double rate = secs > 0 ? static_cast<double>(done) / secs : 0;
  double eta = rate > 0 ? static_cast<double>(total_ - std::min(done, total_)) / rate : 0;
  int pct = total_ ? static_cast<int>(100.0 * static_cast<double>(done) / static_cast<double>(total_)) : 100;
  std::fprintf(stderr, "\r%s %3d%% %s of %s, %s/s, ETA %02d:%02d   ", label_.c_str(), pct, human_bytes(done).c_str(),
               human_bytes(total_).c_str(), human_bytes(static_cast<uint64_t>(rate)).c_str(), static_cast<int>(eta) / 60,
               static_cast<int>(eta) % 60);
  drawn_ = true;
}

void Progress::finish() {
  if (drawn_) std::fprintf(stderr, "\r\033[K");
  drawn_ = false;
}

}  // namespace cbtfs
