// Transport security and bearer tokens for every gRPC connection of
// Momentum: TLS (and mutual TLS) from PEM files, and tokens from a token
// file, shared by the server, the agent, the client and the worker's
// reporter. No LibTorch.
//
// Clients take their files from flags or, when a flag is empty, from
//   MOMENTUM_TLS_CA    CA that signed the server's certificate (enables TLS)
//   MOMENTUM_TLS_CERT  this client's certificate (mutual TLS)
//   MOMENTUM_TLS_KEY   its private key
//   MOMENTUM_TOKEN     the bearer token itself, or
//   MOMENTUM_TOKEN_FILE a file holding it
#ifndef MOMENTUM_COMMON_GRPC_SECURITY_H_
#define MOMENTUM_COMMON_GRPC_SECURITY_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace momentum {

struct TlsFiles {
  std::string ca;    // client: the server's CA; server: the clients' CA
  std::string cert;  // this side's certificate chain
  std::string key;   // and its private key
};

// Flags given win; empty ones come from MOMENTUM_TLS_CA/CERT/KEY.
TlsFiles ClientTlsFromEnv(TlsFiles flags);

// TLS when files.ca is set (with a client certificate when cert and key
// are), else insecure. Errors name the file that cannot be read.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ClientCredentials(
    const TlsFiles& files);

// The token from `token_file` when given, else MOMENTUM_TOKEN, else the
// file MOMENTUM_TOKEN_FILE names; "" when none is set.
absl::StatusOr<std::string> ClientToken(const std::string& token_file);

// Adds "authorization: Bearer <token>" to the call (nothing when empty).
void AddToken(grpc::ClientContext* context, const std::string& token);

// TLS with files.cert and files.key when set, requiring and verifying
// client certificates signed by files.ca when that is set too (mutual
// TLS); insecure when no cert is given.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentials(
    const TlsFiles& files);

// Who may call what.
// user: submits jobs and acts on its own; viewer: reads every job and
// changes nothing; admin: everything; agent: InternalService agent sessions
// only (docs/security.md has the whole matrix). Ranks are none of these:
// they report with per-launch credentials the coordinator issues.
enum class Role { kUser, kAgent, kAdmin, kViewer };

struct Identity {
  std::string name;
  Role role = Role::kUser;
};

// Tokens the server accepts: one per line, "TOKEN NAME ROLE" with ROLE one
// of user (its own jobs), viewer (reads every job), admin (everything) or
// agent (InternalService agent sessions); '#' starts a comment. Lookups
// compare in constant time with every token.
class TokenTable {
 public:
  // INVALID_ARGUMENT names the file, the line and the rule.
  static absl::StatusOr<TokenTable> Load(const std::string& path);
  void Add(const std::string& token, Identity identity);
  std::optional<Identity> Find(const std::string& token) const;
  bool empty() const { return entries_.empty(); }

 private:
  std::vector<std::pair<std::string, Identity>> entries_;
};

// Equal strings, compared in time that depends on their lengths only.
bool ConstantTimeEquals(const std::string& a, const std::string& b);

// 32 random bytes as hex, from /dev/urandom.
absl::StatusOr<std::string> RandomToken();

}  // namespace momentum

#endif  // MOMENTUM_COMMON_GRPC_SECURITY_H_
