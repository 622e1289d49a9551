// The S3 implementation of the Storage interface (AWS S3, Ceph RADOS
// Gateway, MinIO, ...). A repository there is named s3://BUCKET[/PREFIX].
#pragma once

#include <memory>
#include <string>

#include "cbtfs/storage.hpp"

namespace cbtfs {

struct S3Config {
  std::string endpoint;  // "https://s3.example.com" or "http://127.0.0.1:7480"
  std::string region = "us-east-1";
  std::string bucket;
  std::string prefix;  // "" or "backups/site1", no leading or trailing '/'
  std::string access_key, secret_key;
  std::string ca_file;  // empty: the system's CAs
  bool insecure = false;
};

bool is_s3_url(const std::string& url);

// Reads s3://BUCKET[/PREFIX][?endpoint=URL&region=R] and fills in the rest
// from the environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
// AWS_REGION / AWS_DEFAULT_REGION, AWS_ENDPOINT_URL / CBTFS_S3_ENDPOINT,
// CBTFS_S3_CA_FILE, and a key=value file named by CBTFS_S3_CONFIG
// (endpoint, region, access_key, secret_key, ca_file, insecure).
// Credentials never come from the URL, so they never reach argv.
S3Config s3_config_from_url(const std::string& url);

std::unique_ptr<Storage> open_s3_storage(const S3Config& config);

}  // namespace cbtfs
