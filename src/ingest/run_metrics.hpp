// A run's outcome as a Prometheus text file, for node_exporter's textfile
// collector: monitoring alerts on a disk whose last success is too old, or a
// run that failed. The file is replaced whole (written beside, then renamed),
// so the collector never reads half of it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ingest.hpp"

namespace cbtfs::ingest {

struct RunSummary {
  std::vector<Outcome> outcomes;
  int64_t end_time = 0;  // seconds since the epoch
  double seconds = 0;    // the whole run
};

// The text exposition format (version 0.0.4) of summary.
std::string render_metrics(const RunSummary& summary);

// Writes render_metrics(summary) to path atomically; throws
// std::system_error naming the file.
void write_metrics_file(const std::string& path, const RunSummary& summary);

}  // namespace cbtfs::ingest
