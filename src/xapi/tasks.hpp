// XAPI tasks: how an Async call or an HTTP handler reports its outcome.
// The task's ref is known before the work is done, and the host keeps a
// finished task's result for a while, so a caller that loses an answer or
// dies waiting can read back what happened.
#pragma once

#include <string>
#include <vector>

#include "client.hpp"

namespace cbtfs::xapi {

struct TaskOutcome {
  enum class State { Pending, Success, Failure, Gone } state = State::Gone;
  std::string result;              // Success: the ref the call returned ("" if none)
  std::vector<std::string> error;  // Failure: XAPI's error description
};

// Gone when the host no longer knows the task (destroyed, or expired).
TaskOutcome task_outcome(Client& c, const std::string& task);
// Polls until the task ends or `seconds` pass (then Pending).
TaskOutcome wait_task(Client& c, const std::string& task, long seconds);
// Best effort: a task left behind costs the host a little memory, no data.
void cancel_task(Client& c, const std::string& task) noexcept;
void destroy_task(Client& c, const std::string& task) noexcept;

}  // namespace cbtfs::xapi
