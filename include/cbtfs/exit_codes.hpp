// The exit status of every cbtfs command (cbtfs, cbtfs-repo, cbtfs-ingest):
// one table, so that a script reading $? needs to know it once. The man
// pages' EXIT STATUS sections repeat it; keep them together.
#pragma once

namespace cbtfs {

enum ExitCode : int {
  kExitOk = 0,
  // The job ran but failed in part: a VDI not backed up, damage found by
  // verify or ls, a block that failed its checksum on restore, a mount that
  // failed or a file system that ended with an error.
  kExitFailed = 1,
  kExitUsage = 2,    // bad command line or request
  kExitRepo = 3,     // repository missing, not a repository, newer format, unreadable
  kExitXapi = 4,     // XAPI unreachable, TLS refused, login refused, a XAPI error
  kExitIo = 5,       // I/O error, full disk
  kExitLocked = 6,   // another process holds the VDI's lock
  kExitKey = 7,      // an encrypted repository: no passphrase or key file, or a wrong one
};

}  // namespace cbtfs
