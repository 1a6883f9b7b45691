#include "common/grpc_security.h"

#include <algorithm>
#include <cstdlib>
#include <fstream>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/file_util.h"

namespace momentum {
namespace {

std::string Env(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr ? "" : v;
}

}  // namespace

TlsFiles ClientTlsFromEnv(TlsFiles flags) {
  if (flags.ca.empty()) flags.ca = Env("MOMENTUM_TLS_CA");
  if (flags.cert.empty()) flags.cert = Env("MOMENTUM_TLS_CERT");
  if (flags.key.empty()) flags.key = Env("MOMENTUM_TLS_KEY");
  return flags;
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ClientCredentials(
    const TlsFiles& files) {
  if (files.ca.empty()) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions options;
  absl::StatusOr<std::string> ca = ReadWholeFile(files.ca);
  if (!ca.ok()) return ca.status();
  options.pem_root_certs = *ca;
  if (files.cert.empty() != files.key.empty()) {
    return absl::InvalidArgumentError(
        "a client certificate needs its key, and a key its certificate");
  }
  if (!files.cert.empty()) {
    absl::StatusOr<std::string> cert = ReadWholeFile(files.cert);
    if (!cert.ok()) return cert.status();
    absl::StatusOr<std::string> key = ReadWholeFile(files.key);
    if (!key.ok()) return key.status();
    options.pem_cert_chain = *cert;
    options.pem_private_key = *key;
  }
  return grpc::SslCredentials(options);
}

absl::StatusOr<std::string> ClientToken(const std::string& token_file) {
  std::string path = token_file;
  if (path.empty()) {
    if (std::string token = Env("MOMENTUM_TOKEN"); !token.empty()) {
      return std::string(absl::StripAsciiWhitespace(token));
    }
    path = Env("MOMENTUM_TOKEN_FILE");
  }
  if (path.empty()) return std::string();
  absl::StatusOr<std::string> text = ReadWholeFile(path);
  if (!text.ok()) return text.status();
  return std::string(absl::StripAsciiWhitespace(*text));
}

void AddToken(grpc::ClientContext* context, const std::string& token) {
  if (!token.empty()) context->AddMetadata("authorization", "Bearer " + token);
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentials(
    const TlsFiles& files) {
  if (files.cert.empty() && files.key.empty()) {
    if (!files.ca.empty()) {
      return absl::InvalidArgumentError(
          "a client CA (mutual TLS) needs the server's own certificate and "
          "key");
    }
    return grpc::InsecureServerCredentials();
  }
  if (files.cert.empty() || files.key.empty()) {
    return absl::InvalidArgumentError(
        "TLS needs both the certificate and its key");
  }
  absl::StatusOr<std::string> cert = ReadWholeFile(files.cert);
  if (!cert.ok()) return cert.status();
  absl::StatusOr<std::string> key = ReadWholeFile(files.key);
  if (!key.ok()) return key.status();
  grpc::SslServerCredentialsOptions options(
      files.ca.empty()
          ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
          : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  options.pem_key_cert_pairs.push_back({*key, *cert});
  if (!files.ca.empty()) {
    absl::StatusOr<std::string> ca = ReadWholeFile(files.ca);
    if (!ca.ok()) return ca.status();
    options.pem_root_certs = *ca;
  }
  return grpc::SslServerCredentials(options);
}

absl::StatusOr<TokenTable> TokenTable::Load(const std::string& path) {
  absl::StatusOr<std::string> text = ReadWholeFile(path);
  if (!text.ok()) return text.status();
  TokenTable table;
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(*text, '\n')) {
    ++line_number;
    line = line.substr(0, line.find('#'));
    std::vector<absl::string_view> fields =
        absl::StrSplit(line, absl::ByAnyChar(" \t\r"), absl::SkipEmpty());
    if (fields.empty()) continue;
    if (fields.size() != 3) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ":", line_number, ": expected \"TOKEN NAME ROLE\", got ",
          fields.size(), " fields"));
    }
    Identity id;
    id.name = std::string(fields[1]);
    if (fields[2] == "user") {
      id.role = Role::kUser;
    } else if (fields[2] == "agent") {
      id.role = Role::kAgent;
    } else if (fields[2] == "worker") {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ":", line_number,
          ": role worker is no longer accepted: the coordinator gives each "
          "rank a credential of its own at launch; remove the line"));
    } else if (fields[2] == "admin") {
      id.role = Role::kAdmin;
    } else if (fields[2] == "viewer") {
      id.role = Role::kViewer;
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ":", line_number,
                       ": ROLE must be one of user, viewer, admin or "
                       "agent, got \"",
                       fields[2], "\""));
    }
    if (fields[0].size() < 16) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ":", line_number,
                       ": a token must have at least 16 characters"));
    }
    table.Add(std::string(fields[0]), id);
  }
  return table;
}

void TokenTable::Add(const std::string& token, Identity identity) {
  entries_.emplace_back(token, std::move(identity));
}

std::optional<Identity> TokenTable::Find(const std::string& token) const {
  // Every entry is compared, match or not.
  std::optional<Identity> found;
  for (const auto& [t, id] : entries_) {
    if (ConstantTimeEquals(t, token) && !found) found = id;
  }
  return found;
}

bool ConstantTimeEquals(const std::string& a, const std::string& b) {
  const size_t n = std::max(a.size(), b.size());
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? a[i] : 0;
    const unsigned char y = i < b.size() ? b[i] : 0;
    diff |= x ^ y;
  }
  return diff == 0;
}

absl::StatusOr<std::string> RandomToken() {
  std::ifstream in("/dev/urandom", std::ios::binary);
  unsigned char bytes[32];
  if (!in.read(reinterpret_cast<char*>(bytes), sizeof(bytes))) {
    return absl::UnavailableError("cannot read /dev/urandom");
  }
  static const char* kHex = "0123456789abcdef";
  std::string out;
  for (unsigned char b : bytes) {
    out.push_back(kHex[b >> 4]);
    out.push_back(kHex[b & 15]);
  }
  return out;
}

}  // namespace momentum
