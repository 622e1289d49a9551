// The libcurl options every request to the host shares, XML-RPC calls and
// HTTP uploads alike: one place decides how the host's certificate is
// checked (--ca-file, --insecure).
#pragma once

#include <curl/curl.h>

#include "client.hpp"

namespace cbtfs::xapi {

// No signals (threads), http(s) only, the CA file or no verification at
// all as the options say. Timeouts are each request's own: a call must
// answer within opts.timeout_seconds, an upload of a disk takes as long as
// it takes.
void apply_connection_options(CURL* c, const ClientOptions& opts);

}  // namespace cbtfs::xapi
