// A small thread-safe LRU map of immutable values. Values are shared_ptr so a
// reader keeps its copy alive while another thread evicts it.
#pragma once

#include <cstddef>
#include <list>
#include <memory>
#include <mutex>
#include <unordered_map>

namespace cbtfs {

template <typename Key, typename Value, typename Hash = std::hash<Key>>
class LruCache {
 public:
  explicit LruCache(size_t capacity) : capacity_(capacity) {}

  std::shared_ptr<const Value> get(const Key& k) {
    std::lock_guard g(mu_);
    auto it = map_.find(k);
    if (it == map_.end()) return nullptr;
    order_.splice(order_.begin(), order_, it->second.pos);
    return it->second.value;
  }

  void put(const Key& k, std::shared_ptr<const Value> v) {
    if (capacity_ == 0) return;
    std::lock_guard g(mu_);
    if (auto it = map_.find(k); it != map_.end()) {
      it->second.value = std::move(v);
      order_.splice(order_.begin(), order_, it->second.pos);
      return;
    }
    if (map_.size() >= capacity_) {
      map_.erase(order_.back());
      order_.pop_back();
    }
    order_.push_front(k);
    map_.emplace(k, Slot{std::move(v), order_.begin()});
  }

  void erase_if(auto pred) {
    std::lock_guard g(mu_);
    for (auto it = order_.begin(); it != order_.end();) {
      if (pred(*it)) {
        map_.erase(*it);
        it = order_.erase(it);
      } else {
        ++it;
      }
    }
  }

  size_t size() const {
    std::lock_guard g(mu_);
    return map_.size();
  }

 private:
  struct Slot {
    std::shared_ptr<const Value> value;
    typename std::list<Key>::iterator pos;
  };
  size_t capacity_;
  mutable std::mutex mu_;
  std::list<Key> order_;
  std::unordered_map<Key, Slot, Hash> map_;
};

}  // namespace cbtfs
