// Typed errors of the repository library. Callers translate them once:
// the FUSE layer to errno, the commands to exit codes.
#pragma once

#include <stdexcept>
#include <string>

namespace cbtfs {

// A repository file does not parse: truncated, bit-flipped, not ours.
class FormatError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Stored data failed its checksum or does not decompress. Never returns data.
class CorruptError : public FormatError {
 public:
  using FormatError::FormatError;
};

// The repository was written by a newer cbtfs.
class VersionError : public FormatError {
 public:
  using FormatError::FormatError;
};

// The storage below failed (I/O error, full disk, permission).
class StorageError : public std::runtime_error {
 public:
  StorageError(const std::string& what, int err) : std::runtime_error(what), errno_(err) {}
  int error_number() const noexcept { return errno_; }

 private:
  int errno_;
};

// Another writer holds the VDI's lock.
class LockedError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// An encrypted repository and nothing that opens it: no passphrase or key
// file given, or none given opens a key slot.
class KeyError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The request makes no sense for this repository (unknown VDI, bad time, ...).
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace cbtfs
