// The one translation from what a command throws to a message on standard
// error and an exit code of the table in cbtfs/exit_codes.hpp, shared by
// cbtfs-repo and cbtfs-ingest so that the same failure exits the same way.
#pragma once

#include <cerrno>
#include <cstdio>
#include <exception>

#include "cbtfs/errors.hpp"
#include "cbtfs/exit_codes.hpp"
#include "xapi/client.hpp"
#include "xapi/vdi_import.hpp"

namespace cbtfs {

// Call from a catch block: reports the exception in flight as "prog: what".
inline int report_exception(const char* prog) {
  try {
    throw;
  } catch (const UsageError& e) {
    std::fprintf(stderr, "%s: %s\n", prog, e.what());
    return kExitUsage;
  } catch (const LockedError& e) {
    std::fprintf(stderr, "%s: %s\n", prog, e.what());
    return kExitLocked;
  } catch (const KeyError& e) {
    std::fprintf(stderr, "%s: %s\n", prog, e.what());
    return kExitKey;
  } catch (const CorruptError& e) {
    std::fprintf(stderr, "%s: damaged data: %s\n", prog, e.what());
    return kExitFailed;
  } catch (const FormatError& e) {  // a damaged header, a newer format
    std::fprintf(stderr, "%s: %s\n", prog, e.what());
    return kExitRepo;
  } catch (const xapi::XapiError& e) {
    std::fprintf(stderr, "%s: %s\n", prog, e.what());
    return kExitXapi;
  } catch (const xapi::TransportError& e) {
    std::fprintf(stderr, "%s: %s\n", prog, e.what());
    return kExitXapi;
  } catch (const xapi::ImportError& e) {  // a restore's upload: the data did not land
    std::fprintf(stderr, "%s: %s\n", prog, e.what());
    return kExitIo;
  } catch (const StorageError& e) {
    std::fprintf(stderr, "%s: %s\n", prog, e.what());
    // Missing or forbidden (permissions, S3 credentials): cannot be opened.
    return e.error_number() == ENOENT || e.error_number() == EACCES ? kExitRepo : kExitIo;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: %s\n", prog, e.what());
    return kExitIo;
  }
}

}  // namespace cbtfs
