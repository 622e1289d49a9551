#include "tasks.hpp"

#include <chrono>
#include <thread>

namespace cbtfs::xapi {

namespace {
// task.get_result is the XML-RPC serialisation of the value:
// "<value>OpaqueRef:...</value>".
std::string ref_in_result(const std::string& xml) {
  auto at = xml.find("OpaqueRef:");
  if (at == std::string::npos) return {};
  return xml.substr(at, xml.find('<', at) - at);
}
}  // namespace

TaskOutcome task_outcome(Client& c, const std::string& task) {
  TaskOutcome o;
  try {
    std::string status = c.call("task.get_status", {Value(task)}).str();
    if (status == "pending" || status == "cancelling") {
      o.state = TaskOutcome::State::Pending;
    } else if (status == "success") {
      o.state = TaskOutcome::State::Success;
      o.result = ref_in_result(c.call("task.get_result", {Value(task)}).str());
    } else {
      o.state = TaskOutcome::State::Failure;
      Value info = c.call("task.get_error_info", {Value(task)});  // named: the loop borrows from it
      for (auto& v : info.array()) o.error.push_back(v.str());
      if (o.error.empty()) o.error.push_back(status == "cancelled" ? "TASK_CANCELLED" : "INTERNAL_ERROR");
    }
  } catch (const XapiError& e) {
    if (e.code() != "HANDLE_INVALID") throw;  // the host dropped the finished task
  }
  return o;
}

TaskOutcome wait_task(Client& c, const std::string& task, long seconds) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(seconds);
  // Fine at first (a snapshot of a small or quiet disk takes milliseconds,
  // and an incremental run is worth little more), then about once a second.
  auto pause = std::chrono::milliseconds(5);
  for (;;) {
    TaskOutcome o = task_outcome(c, task);
    if (o.state != TaskOutcome::State::Pending || std::chrono::steady_clock::now() >= deadline) return o;
    std::this_thread::sleep_for(pause);
    pause = std::min<std::chrono::milliseconds>(pause * 3 / 2 + std::chrono::milliseconds(1), std::chrono::seconds(1));
  }
}

void cancel_task(Client& c, const std::string& task) noexcept {
  try {
    c.call("task.cancel", {Value(task)});
  } catch (const std::exception&) {
  }
}

void destroy_task(Client& c, const std::string& task) noexcept {
  try {
    c.call("task.destroy", {Value(task)});
  } catch (const std::exception&) {
  }
}

}  // namespace cbtfs::xapi
