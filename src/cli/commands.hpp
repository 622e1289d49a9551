// The subcommands of cbtfs-repo, one file each. They return the exit code;
// errors thrown out of them are mapped in repo_main.cpp.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "cbtfs/exit_codes.hpp"
#include "cbtfs/point_reader.hpp"
#include "cbtfs/repository.hpp"
#include "xapi/client.hpp"

namespace cbtfs {

struct ImportArgs {
  std::string repo, image, vdi, vm_name, vdi_name, time;
  std::optional<uint64_t> size;  // --size: needed for a pipe, checked for a file
  bool quiet = false;
};

// Repository::open, with every reason it cannot be opened (missing, not a
// repository, newer format, unreadable) one exit status (kExitRepo).
// with_key=false: an encrypted repository stays locked (Repository::open_without_key).
std::shared_ptr<Repository> open_repository(const std::string& path, bool with_key = true);

// A VDI's point by its name as in ls ("2026-11-24T030000Z", with or without
// ".raw") or "latest"; UsageError naming what exists when there is none.
ManifestPtr find_point(Repository& repo, const std::string& vdi, const std::string& point);
// What a XenServer VDI holds at offset when a point is written into it: the
// point's bytes, verified (a block that cannot be read is damaged data),
// then zeros up to the VDI's size (XAPI rounds sizes up to a sector).
size_t read_for_vdi(PointReader& reader, uint64_t image_size, uint64_t offset, std::span<std::byte> out);

// Best effort, after a command committed points: see merge_index_segments.
void merge_index_after_writing(Repository& repo, const char* program);

struct InitArgs {
  std::string repo;
  uint32_t format = 2;
  std::string encryption = "none";
  std::string cipher = "aes-256-ocb";
};
int cmd_init(const InitArgs& a);
int cmd_import(const ImportArgs& a);
int cmd_ls(const std::string& repo, bool json);
int cmd_info(const std::string& repo, const std::string& vdi);
int cmd_verify(const std::string& repo, const std::string& vdi);
int cmd_verify_stored(const std::string& repo, const std::string& vdi);
struct PruneArgs {
  std::string repo, vdi;
  int last = 0, hourly = 0, daily = 0, weekly = 0, monthly = 0, yearly = 0;
  bool dry_run = false;
};
int cmd_prune(const PruneArgs& a);
int cmd_forget(const std::string& repo, const std::string& vdi);
int cmd_gc(const std::string& repo, bool dry_run);
struct CopyArgs {
  std::string src, dst;
  // What opens DST when it has a key of its own (else what opens SRC).
  std::string dst_passphrase_file, dst_key_file;
  std::vector<std::string> vdis;  // empty: every VDI of src
  bool dry_run = false, quiet = false;
};
int cmd_copy(const CopyArgs& a);

struct KeyArgs {
  std::string action;  // list, add, change, remove, export, import
  std::string repo, slot;
  std::string new_passphrase_file, new_key_file;  // add, change, import
  bool paper = false;         // export
  std::string recovery_file;  // import ("-" or "": standard input)
};
int cmd_key(const KeyArgs& a);
int cmd_restore(const std::string& repo, const std::string& vdi, const std::string& point, const std::string& dest,
                bool force);
struct RestoreXapiArgs {
  std::string repo, vdi, point, sr, name;
  bool sparse = true;  // false: every byte, zeros too (--no-sparse)
  xapi::ClientOptions xapi;
};
int cmd_restore_xapi(const RestoreXapiArgs& a);
struct RollbackArgs {
  std::string repo, vdi, point;
  bool dry_run = false;    // only say what would be written
  bool keep_undo = false;  // keep the snapshot taken before writing
  xapi::ClientOptions xapi;
};
int cmd_rollback(const RollbackArgs& a);

}  // namespace cbtfs
