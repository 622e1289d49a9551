// cbtfs-repo COMMAND [OPTIONS] REPO: command-line parsing and the one place
// where errors become exit codes and messages.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdlib>
#include <cstdio>

#include "cbtfs/errors.hpp"
#include "cbtfs/format.hpp"
#include "cbtfs/size_arg.hpp"
#include "commands.hpp"
#include "exit_status.hpp"
#include "password.hpp"

using namespace cbtfs;

namespace cbtfs {

std::shared_ptr<Repository> open_repository(const std::string& path, bool with_key) {
  try {
    return with_key ? Repository::open(path) : Repository::open_without_key(path);
  } catch (const UsageError& e) {  // a directory that is no repository
    throw FormatError(e.what());
  }
}

}  // namespace cbtfs

namespace {

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

std::string command_names(CLI::App& app) {
  std::string names;
  for (auto* sub : app.get_subcommands({})) names += (names.empty() ? "" : ", ") + sub->get_name();
  return names;
}

// CLI11 reports a word that is no command as "A subcommand is required",
// which hides the typo; say which word it was and what the commands are.
void check_command(CLI::App& app, int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.empty()) continue;
    if (a[0] == '-') {  // the program's own options: --help, or --key-file FILE before the command
      auto* opt = a.find('=') == std::string::npos ? app.get_option_no_throw(a) : nullptr;
      if (opt && opt->get_items_expected_min() > 0) ++i;
      continue;
    }
    auto subs = app.get_subcommands({});
    if (std::none_of(subs.begin(), subs.end(), [&](CLI::App* sub) { return sub->check_name(a); }))
      throw UsageError("unknown command '" + a + "'; the commands are: " + command_names(app));
    return;
  }
  if (argc <= 1) throw UsageError("a command is required: " + command_names(app) + " (see cbtfs-repo --help)");
}

int run(int argc, char** argv) {
  CLI::App app{"cbtfs-repo: inspect and maintain a cbtfs backup repository", "cbtfs-repo"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string("cbtfs-repo ") + CBTFS_VERSION);
  std::string repo, vdi;
  bool json = false;
  ImportArgs ia;

  // Every command: what opens an encrypted repository (also from the
  // environment, see ENCRYPTION in cbtfs-repo(1)); never the secret itself.
  std::string passphrase_file, key_file;
  app.add_option("--passphrase-file", passphrase_file,
                 "file whose first line is the passphrase of an encrypted repository (or CBTFS_PASSPHRASE_FILE)");
  app.add_option("--key-file", key_file, "key file of an encrypted repository (or CBTFS_KEY_FILE)");
  app.fallthrough();  // before the commands are made: they inherit it

  auto* init = app.add_subcommand("init", "create an empty repository");
  uint32_t format = 2;
  init->add_option("--format", format,
                   "2 (the default): one deduplicated block store for every VDI; 1: packs per VDI (the first format)")
      ->check(CLI::Range(1u, kFormatVersion));
  InitArgs ina;
  init->add_option("--encryption", ina.encryption,
                   "none (the default), passphrase or keyfile: seal every block, index and manifest "
                   "under a random key held in a key slot that the passphrase or key file opens")
      ->check(CLI::IsMember({"none", "passphrase", "keyfile"}));
  init->add_option("--cipher", ina.cipher,
                   "with --encryption: aes-256-ocb (the default; the fastest here) or aes-256-gcm (where a standard "
                   "asks for GCM)")
      ->check(CLI::IsMember({"aes-256-ocb", "aes-256-gcm"}));
  init->add_option("REPO", repo, "repository directory")->required();

  auto* imp = app.add_subcommand("import", "store a raw disk image as the next point of a VDI");
  imp->add_option("--vdi", ia.vdi, "VDI uuid (default: the one VDI with these names, else a new VDI)");
  imp->add_option("--vm-name", ia.vm_name, "name of the VM the disk belongs to");
  imp->add_option("--vdi-name", ia.vdi_name, "name of the disk");
  imp->add_option("--time", ia.time, "time of the point, ISO 8601 (default: now)");
  std::string import_size;
  imp->add_option("--size", import_size, "size of the disk in bytes (512M, 10G, ...): needed when IMAGE is a pipe");
  imp->add_flag("-q,--quiet", ia.quiet, "print nothing on success");
  imp->add_option("REPO", ia.repo, "repository")->required();
  imp->add_option("IMAGE", ia.image, "raw image file or block device")->required();

  auto* ls = app.add_subcommand("ls", "list VDIs and their points");
  ls->add_flag("--json", json, "machine-readable output");
  ls->add_option("REPO", repo, "repository")->required();

  auto* info = app.add_subcommand("info", "summary of the repository or of one VDI");
  info->add_option("REPO", repo, "repository")->required();
  info->add_option("VDI", vdi, "VDI uuid");

  auto* verify = app.add_subcommand("verify", "read every stored block and check every checksum");
  verify->add_option("REPO", repo, "repository")->required();
  verify->add_option("VDI", vdi, "VDI uuid (default: all)");
  bool stored_only = false;
  verify->add_flag("--stored-only", stored_only,
                   "check what is stored against its stored checksums, without the key (format 2)");

  std::string point, dest;
  bool force = false;
  RestoreXapiArgs ra;
  std::string password_file;
  auto* restore = app.add_subcommand("restore", "write a point to a file, a block device, or a new VDI on XenServer");
  restore->add_flag("-f,--force", force, "overwrite an existing file");
  restore->add_option("--xapi", ra.xapi.url, "restore to XenServer: the pool master, e.g. https://pool-master");
  restore->add_option("--sr", ra.sr, "with --xapi: uuid of the SR the new VDI goes to");
  restore->add_option("--name", ra.name, "with --xapi: name of the new VDI (default: the disk's, marked restored)");
  restore->add_option("--user", ra.xapi.user, "with --xapi: user name")->default_val("root");
  restore->add_option("--password-file", password_file, "with --xapi: file holding the password (else $CBTFS_PASSWORD)");
  restore->add_option("--ca-file", ra.xapi.ca_file, "with --xapi: CA certificate(s) to verify the host with");
  restore->add_flag("--insecure", ra.xapi.insecure, "with --xapi: do not verify the host's TLS certificate");
  bool no_sparse = false;
  restore->add_flag("--no-sparse", no_sparse,
                    "with --xapi: send every byte, zeros too, for an SR whose new VDIs do not read as zeros");
  restore->add_option("REPO", repo, "repository")->required();
  restore->add_option("VDI", vdi, "VDI uuid")->required();
  restore->add_option("POINT", point, "point: its time (as in ls) or 'latest'")->required();
  restore->add_option("DEST", dest, "file or block device (not with --xapi)");

  RollbackArgs rb;
  std::string rb_password_file;
  auto* rollback = app.add_subcommand(
      "rollback", "write back into the original VDI on XenServer only the blocks that differ from a point");
  rollback->add_option("--xapi", rb.xapi.url, "the pool master, e.g. https://pool-master")->required();
  rollback->add_option("--user", rb.xapi.user, "user name")->default_val("root");
  rollback->add_option("--password-file", rb_password_file, "file holding the password (else $CBTFS_PASSWORD)");
  rollback->add_option("--ca-file", rb.xapi.ca_file, "CA certificate(s) to verify the host with");
  rollback->add_flag("--insecure", rb.xapi.insecure, "do not verify the host's TLS certificate");
  rollback->add_flag("-n,--dry-run", rb.dry_run, "only say how much would be written, and why");
  rollback->add_flag("--keep-undo", rb.keep_undo, "keep the snapshot taken before writing, as a way back");
  rollback->add_option("REPO", rb.repo, "repository")->required();
  rollback->add_option("VDI", rb.vdi, "uuid of the VDI: the disk the point was taken of")->required();
  rollback->add_option("POINT", rb.point, "point: its time (as in ls) or 'latest'")->required();

  PruneArgs pa;
  auto* prune = app.add_subcommand("prune", "remove points a retention policy does not keep, and free their space");
  prune->add_option("--keep-last", pa.last, "keep the newest N points");
  prune->add_option("--keep-hourly", pa.hourly, "keep the newest point of each of the last N hours");
  prune->add_option("--keep-daily", pa.daily, "... of the last N days");
  prune->add_option("--keep-weekly", pa.weekly, "... of the last N weeks");
  prune->add_option("--keep-monthly", pa.monthly, "... of the last N months");
  prune->add_option("--keep-yearly", pa.yearly, "... of the last N years");
  prune->add_flag("-n,--dry-run", pa.dry_run, "only say what would be removed");
  prune->add_option("REPO", pa.repo, "repository")->required();
  prune->add_option("VDI", pa.vdi, "VDI uuid (default: all)");

  auto* forget = app.add_subcommand("forget", "remove a VDI with all its points");
  forget->add_option("REPO", repo, "repository")->required();
  forget->add_option("VDI", vdi, "VDI uuid")->required();

  KeyArgs ka;
  auto* key = app.add_subcommand("key", "an encrypted repository's keys: list, add, change, remove, export, import");
  key->require_subcommand(1);
  auto new_key_options = [&](CLI::App* sub) {
    auto* p = sub->add_option("--new-passphrase-file", ka.new_passphrase_file, "file whose first line is the new passphrase");
    sub->add_option("--new-key-file", ka.new_key_file, "the new key file (at least 32 random bytes)")->excludes(p);
  };
  auto* key_list = key->add_subcommand("list", "the key slots, and which one opened the repository");
  key_list->add_option("REPO", ka.repo, "repository")->required();
  auto* key_add = key->add_subcommand("add", "a new key slot, opened by another passphrase or key file");
  new_key_options(key_add);
  key_add->add_option("REPO", ka.repo, "repository")->required();
  auto* key_change = key->add_subcommand("change", "replace the slot that opens the repository with a new passphrase or key file");
  new_key_options(key_change);
  key_change->add_option("REPO", ka.repo, "repository")->required();
  auto* key_remove = key->add_subcommand("remove", "remove a key slot (never the last one)");
  key_remove->add_option("REPO", ka.repo, "repository")->required();
  key_remove->add_option("SLOT", ka.slot, "slot id, as key list shows it")->required();
  auto* key_export = key->add_subcommand("export", "print the recovery key: keep it apart from the backups");
  key_export->add_flag("--paper", ka.paper, "numbered lines with check digits, to print and type back");
  key_export->add_option("REPO", ka.repo, "repository")->required();
  auto* key_import = key->add_subcommand("import", "a new key slot from the recovery key, when every other is lost");
  new_key_options(key_import);
  key_import->add_option("--recovery-file", ka.recovery_file, "file holding the recovery key (default: standard input)");
  key_import->add_option("REPO", ka.repo, "repository")->required();

  bool gc_dry_run = false;
  auto* gc = app.add_subcommand("gc", "format 2: free the blocks no point references (prune and forget run it)");
  gc->add_flag("-n,--dry-run", gc_dry_run, "only say what would be freed");
  gc->add_option("REPO", repo, "repository")->required();

  CopyArgs ca;
  auto* copy = app.add_subcommand("copy", "copy the points of SRC that DST lacks (local or S3, any format)");
  copy->add_flag("-n,--dry-run", ca.dry_run, "only say which points would be copied");
  copy->add_flag("-q,--quiet", ca.quiet, "print nothing on success");
  copy->add_option("SRC", ca.src, "repository to copy from")->required();
  copy->add_option("DST", ca.dst, "repository to copy into (created with cbtfs-repo init)")->required();
  copy->add_option("VDI", ca.vdis, "VDI uuids (default: all)");
  auto* dst_pass = copy->add_option("--dst-passphrase-file", ca.dst_passphrase_file,
                                    "file whose first line is DST's passphrase, when it is not SRC's");
  copy->add_option("--dst-key-file", ca.dst_key_file, "DST's key file, when it is not SRC's")->excludes(dst_pass);

  check_command(app, argc, argv);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int rc = app.exit(e);
    return rc == 0 ? kExitOk : kExitUsage;
  }
  vdi = lower(vdi);
  pa.vdi = lower(pa.vdi);
  if (!pa.vdi.empty() && !is_uuid(pa.vdi)) throw UsageError("'" + pa.vdi + "' is not a VDI uuid");
  ia.vdi = lower(ia.vdi);
  if (!import_size.empty()) {
    ia.size = parse_size(import_size);
    if (!ia.size || *ia.size == 0) throw UsageError("--size '" + import_size + "': give bytes, or a size such as 10G");
  }
  if (!vdi.empty() && !is_uuid(vdi)) throw UsageError("'" + vdi + "' is not a VDI uuid");
  if (!ia.vdi.empty() && !is_uuid(ia.vdi)) throw UsageError("--vdi '" + ia.vdi + "' is not a uuid");

  // Given here, they reach every repository the command opens, as the
  // environment does for the other commands.
  if (!passphrase_file.empty()) ::setenv("CBTFS_PASSPHRASE_FILE", passphrase_file.c_str(), 1);
  if (!key_file.empty()) ::setenv("CBTFS_KEY_FILE", key_file.c_str(), 1);
  if (*init) {
    if (init->count("--cipher") && ina.encryption == "none")
      throw UsageError("--cipher chooses how an encrypted repository seals: give --encryption passphrase or keyfile too");
    ina.repo = repo;
    ina.format = format;
    return cmd_init(ina);
  }
  if (*imp) return cmd_import(ia);
  if (*ls) return cmd_ls(repo, json);
  if (*info) return cmd_info(repo, vdi);
  if (*verify) return stored_only ? cmd_verify_stored(repo, vdi) : cmd_verify(repo, vdi);
  if (*prune) return cmd_prune(pa);
  if (*forget) return cmd_forget(repo, vdi);
  if (*gc) return cmd_gc(repo, gc_dry_run);
  if (*key) {
    for (auto* sub : {key_list, key_add, key_change, key_remove, key_export, key_import})
      if (*sub) ka.action = sub->get_name();
    return cmd_key(ka);
  }
  if (*copy) {
    for (auto& v : ca.vdis) {
      v = lower(v);
      if (!is_uuid(v)) throw UsageError("'" + v + "' is not a VDI uuid");
    }
    return cmd_copy(ca);
  }
  if (*rollback) {
    rb.vdi = lower(rb.vdi);
    if (!is_uuid(rb.vdi)) throw UsageError("'" + rb.vdi + "' is not a VDI uuid");
    if (rb.xapi.url.find("://") == std::string::npos) rb.xapi.url = "https://" + rb.xapi.url;
    rb.xapi.password = read_password(rb_password_file);
    return cmd_rollback(rb);
  }
  if (*restore && !ra.xapi.url.empty()) {
    if (!dest.empty()) throw UsageError("give either DEST or --xapi, not both");
    if (ra.sr.empty()) throw UsageError("--xapi needs --sr SR-UUID: where the new VDI goes");
    if (ra.xapi.url.find("://") == std::string::npos) ra.xapi.url = "https://" + ra.xapi.url;
    ra.xapi.password = read_password(password_file);
    ra.sparse = !no_sparse;
    ra.repo = repo;
    ra.vdi = vdi;
    ra.point = point;
    return cmd_restore_xapi(ra);
  }
  if (*restore && no_sparse) throw UsageError("--no-sparse goes with --xapi: a file or device is always written sparse");
  if (*restore && dest.empty()) throw UsageError("restore needs DEST (a file or block device) or --xapi");
  if (*restore) return cmd_restore(repo, vdi, point, dest, force);
  return kExitUsage;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (...) {
    return report_exception("cbtfs-repo");
  }
}
