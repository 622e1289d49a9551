// Many independent requests to a storage that answers each after a round
// trip (S3) finish sooner in flight together: prune and the collection
// walk VDIs, segments and packs this way.
#pragma once

#include <cstddef>
#include <functional>

namespace cbtfs {

// Calls fn(i) for every i in [0, n), on up to `threads` threads (the
// caller's among them; 1: in order, on the caller's). After an exception
// no new i is started; the first one is rethrown once the others are done.
void parallel_for(size_t n, unsigned threads, const std::function<void(size_t)>& fn);

}  // namespace cbtfs
