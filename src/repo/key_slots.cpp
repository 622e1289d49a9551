#include "cbtfs/key_slots.hpp"

#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <sys/prctl.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "cbtfs/errors.hpp"

namespace cbtfs {

namespace {

// scrypt at 2^17 x 8 x 128 bytes: 128 MiB and about half a second per try
// here, the cost OWASP advises for interactive logins; paid once per command.
constexpr uint64_t kScryptN = 1 << 17;
constexpr uint32_t kScryptR = 8, kScryptP = 1;
constexpr size_t kSaltSize = 16, kMinKeyFile = 32;

Bytes from_hex(const std::string& s) {
  auto v = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    throw FormatError("malformed key slot");
  };
  if (s.size() % 2) throw FormatError("malformed key slot");
  Bytes b(s.size() / 2);
  for (size_t i = 0; i < b.size(); ++i) b[i] = std::byte(static_cast<unsigned char>(v(s[2 * i]) << 4 | v(s[2 * i + 1])));
  return b;
}

DataKey derive(const KeySlot& slot, const Unlocker& u) {
  Bytes salt = from_hex(slot.salt);
  DataKey kek{};
  if (u.kind == Unlocker::Kind::passphrase) {
    if (slot.n < 2 || slot.n > (uint64_t{1} << 24) || slot.r == 0 || slot.r > 64 || slot.p == 0 || slot.p > 16)
      throw FormatError("key slot with unreasonable scrypt parameters");
    uint64_t maxmem = 128 * slot.n * slot.r * slot.p + (64 << 20);
    if (EVP_PBE_scrypt(u.secret.data(), u.secret.size(), reinterpret_cast<const unsigned char*>(salt.data()),
                       salt.size(), slot.n, slot.r, slot.p, maxmem, kek.data(), kek.size()) != 1)
      throw std::runtime_error("scrypt failed (out of memory?)");
  } else {
    // A key file is random already: HKDF's extract step (HMAC under the
    // salt) is all it needs.
    unsigned int len = 0;
    if (!HMAC(EVP_sha256(), salt.data(), static_cast<int>(salt.size()),
              reinterpret_cast<const unsigned char*>(u.secret.data()), u.secret.size(), kek.data(), &len) ||
        len != kek.size())
      throw std::runtime_error("HMAC-SHA-256 failed");
  }
  return kek;
}

const char* kind_name(Unlocker::Kind k) { return k == Unlocker::Kind::passphrase ? "passphrase" : "keyfile"; }

std::string slot_aad(const std::string& repo_id) { return "cbtfs key slot " + repo_id; }

std::string read_all(const std::string& path, const char* what) {
  keep_secrets_out_of_core_dumps();
  std::ifstream in(path, std::ios::binary);
  if (!in) throw UsageError(std::string("cannot read the ") + what + " " + path + ": " + std::strerror(errno));
  return std::string(std::istreambuf_iterator<char>(in), {});
}

}  // namespace

void keep_secrets_out_of_core_dumps() {
  if (::prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0)
    throw UsageError(std::string("cannot protect secrets from core dumps: ") + std::strerror(errno));
}

Bytes encode_key_slot(const KeySlot& k) {
  nlohmann::json j{{"kind", k.kind}, {"salt", k.salt}, {"sealed", k.sealed}};
  if (k.kind == "passphrase") j.update({{"kdf", "scrypt"}, {"n", k.n}, {"r", k.r}, {"p", k.p}});
  std::string text = nlohmann::json{{"key_slot", j}}.dump(1) + "\n";
  return Bytes(reinterpret_cast<const std::byte*>(text.data()), reinterpret_cast<const std::byte*>(text.data()) + text.size());
}

KeySlot decode_key_slot(std::span<const std::byte> data, const std::string& where) {
  try {
    auto j = nlohmann::json::parse(reinterpret_cast<const char*>(data.data()),
                                   reinterpret_cast<const char*>(data.data()) + data.size())
                 .at("key_slot");
    KeySlot k;
    k.kind = j.at("kind").get<std::string>();
    k.salt = j.at("salt").get<std::string>();
    k.sealed = j.at("sealed").get<std::string>();
    if (k.kind == "passphrase") {
      if (j.at("kdf").get<std::string>() != "scrypt") throw FormatError("a key slot of an unknown kind");
      k.n = j.at("n").get<uint64_t>();
      k.r = j.at("r").get<uint32_t>();
      k.p = j.at("p").get<uint32_t>();
    } else if (k.kind != "keyfile") {
      throw FormatError("a key slot of an unknown kind (" + k.kind + ")");
    }
    return k;
  } catch (const nlohmann::json::exception&) {
    throw FormatError(where + ": malformed key slot");
  } catch (const FormatError& e) {
    throw FormatError(where + ": " + e.what());
  }
}

std::string random_slot_id() {
  unsigned char b[8];
  if (RAND_bytes(b, sizeof b) != 1) throw std::runtime_error("no random bytes for a key slot");
  return to_hex(b, sizeof b);
}

RepoSecret random_repo_secret() {
  RepoSecret s;
  if (RAND_bytes(s.data_key.data(), static_cast<int>(s.data_key.size())) != 1 ||
      RAND_bytes(s.id_key.data(), static_cast<int>(s.id_key.size())) != 1)
    throw std::runtime_error("no random bytes for a key");
  return s;
}

KeySlot make_key_slot(const RepoSecret& secret, const Unlocker& u, const std::string& repo_id) {
  KeySlot slot;
  slot.kind = kind_name(u.kind);
  unsigned char salt[kSaltSize];
  if (RAND_bytes(salt, sizeof salt) != 1) throw std::runtime_error("no random bytes for a salt");
  slot.salt = to_hex(salt, sizeof salt);
  if (u.kind == Unlocker::Kind::passphrase) {
    if (u.secret.empty()) throw UsageError("the passphrase is empty");
    slot.n = kScryptN;
    slot.r = kScryptR;
    slot.p = kScryptP;
  } else if (u.secret.size() < kMinKeyFile) {
    throw UsageError("the key file " + u.source + " holds " + std::to_string(u.secret.size()) +
                     " bytes; it needs at least 32 random ones (head -c 32 /dev/urandom > FILE)");
  }
  Bytes plain(secret.data_key.size() + secret.id_key.size());
  std::memcpy(plain.data(), secret.data_key.data(), secret.data_key.size());
  std::memcpy(plain.data() + secret.data_key.size(), secret.id_key.data(), secret.id_key.size());
  std::string aad = slot_aad(repo_id);
  Bytes sealed = Sealer(derive(slot, u)).seal(plain, std::as_bytes(std::span(aad)));
  std::memset(plain.data(), 0, plain.size());
  slot.sealed = to_hex(reinterpret_cast<const unsigned char*>(sealed.data()), sealed.size());
  return slot;
}

std::optional<RepoSecret> open_key_slot(const KeySlot& slot, const Unlocker& u, const std::string& repo_id) {
  if (slot.kind != kind_name(u.kind)) return std::nullopt;
  Bytes sealed = from_hex(slot.sealed);
  RepoSecret s;
  if (sealed.size() != kSealOverhead + s.data_key.size() + s.id_key.size()) throw FormatError("malformed key slot");
  Bytes plain(sealed.size() - kSealOverhead);
  std::string aad = slot_aad(repo_id);
  try {
    Sealer(derive(slot, u)).open(sealed, std::as_bytes(std::span(aad)), plain);
  } catch (const CorruptError&) {
    return std::nullopt;  // another passphrase or key file
  }
  std::memcpy(s.data_key.data(), plain.data(), s.data_key.size());
  std::memcpy(s.id_key.data(), plain.data() + s.data_key.size(), s.id_key.size());
  std::memset(plain.data(), 0, plain.size());
  return s;
}

Unlocker read_passphrase_file(const std::string& path) {
  std::string text = read_all(path, "passphrase file");
  std::string line = text.substr(0, text.find('\n'));
  if (!line.empty() && line.back() == '\r') line.pop_back();
  return {Unlocker::Kind::passphrase, line, path};
}

Unlocker read_key_file(const std::string& path) {
  return {Unlocker::Kind::keyfile, read_all(path, "key file"), path};
}

Unlocker read_unlocker(const std::string& passphrase_file, const std::string& key_file) {
  return key_file.empty() ? read_passphrase_file(passphrase_file) : read_key_file(key_file);
}

std::vector<Unlocker> unlockers_from_environment() {
  std::vector<Unlocker> out;
  if (const char* f = std::getenv("CBTFS_PASSPHRASE_FILE"); f && *f) out.push_back(read_passphrase_file(f));
  if (const char* f = std::getenv("CBTFS_KEY_FILE"); f && *f) out.push_back(read_key_file(f));
  if (const char* dir = std::getenv("CREDENTIALS_DIRECTORY"); dir && *dir) {
    std::string d = dir;
    if (std::ifstream(d + "/cbtfs-passphrase")) out.push_back(read_passphrase_file(d + "/cbtfs-passphrase"));
    if (std::ifstream(d + "/cbtfs-key")) out.push_back(read_key_file(d + "/cbtfs-key"));
  }
  if (const char* p = std::getenv("CBTFS_PASSPHRASE"); p && *p) {
    keep_secrets_out_of_core_dumps();
    out.push_back({Unlocker::Kind::passphrase, p, "$CBTFS_PASSPHRASE"});
  }
  return out;
}

}  // namespace cbtfs
