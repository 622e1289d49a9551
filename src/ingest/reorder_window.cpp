#include "reorder_window.hpp"

#include <cassert>
#include <utility>

namespace cbtfs::ingest {

ReorderWindow::ReorderWindow(size_t count, std::function<size_t(size_t)> bytes_of, size_t max_ahead)
    : count_(count), bytes_of_(std::move(bytes_of)), max_ahead_(max_ahead) {}

bool ReorderWindow::claim(size_t max_items, size_t max_bytes, Batch& batch) {
  batch.buffers.clear();
  std::unique_lock lk(mu_);
  // ahead_ == 0 means every claimed item was released: the next one is
  // always admitted, so the writer never waits on the bound.
  room_cv_.wait(lk, [&] {
    return stop_ || next_ >= count_ || ahead_ == 0 || ahead_ + bytes_of_(next_) <= max_ahead_;
  });
  if (stop_ || next_ >= count_) return false;
  batch.first = next_;
  size_t bytes = 0;
  while (next_ < count_ && batch.buffers.size() < max_items &&
         (batch.buffers.empty() ||
          (bytes + bytes_of_(next_) <= max_bytes && ahead_ + bytes_of_(next_) <= max_ahead_))) {
    size_t size = bytes_of_(next_);
    bytes += size;
    ahead_ += size;
    ++next_;
    WindowBuffer b;
    if (!spare_.empty() && spare_.back().capacity >= size) {
      b = std::move(spare_.back());
      spare_.pop_back();
    }
    b.size = size;
    batch.buffers.push_back(std::move(b));
  }
  return true;
}

void ReorderWindow::put(Batch& batch) {
  {
    std::lock_guard g(mu_);
    for (size_t k = 0; k < batch.buffers.size(); ++k) ready_.emplace(batch.first + k, std::move(batch.buffers[k]));
  }
  batch.buffers.clear();
  ready_cv_.notify_all();
}

void ReorderWindow::put(size_t item, WindowBuffer buffer) {
  {
    std::lock_guard g(mu_);
    ready_.emplace(item, std::move(buffer));
  }
  ready_cv_.notify_all();
}

std::optional<WindowBuffer> ReorderWindow::take() {
  std::unique_lock lk(mu_);
  if (taken_ >= count_) return std::nullopt;
  ready_cv_.wait(lk, [&] { return failure_ || stop_ || ready_.count(taken_); });
  if (failure_) std::rethrow_exception(failure_);
  auto it = ready_.find(taken_);
  if (it == ready_.end()) return std::nullopt;  // stopped
  WindowBuffer b = std::move(it->second);
  ready_.erase(it);
  ++taken_;
  return b;
}

void ReorderWindow::release(WindowBuffer buffer) {
  {
    std::lock_guard g(mu_);
    assert(released_ < taken_);
    ahead_ -= bytes_of_(released_++);
    spare_.push_back(std::move(buffer));
  }
  room_cv_.notify_all();
}

void ReorderWindow::fail(std::exception_ptr e) {
  {
    std::lock_guard g(mu_);
    if (!failure_) failure_ = std::move(e);
    stop_ = true;
  }
  room_cv_.notify_all();
  ready_cv_.notify_all();
}

void ReorderWindow::stop() {
  {
    std::lock_guard g(mu_);
    stop_ = true;
  }
  room_cv_.notify_all();
  ready_cv_.notify_all();
}

bool ReorderWindow::stopped() const {
  std::lock_guard g(mu_);
  return stop_;
}

}  // namespace cbtfs::ingest
