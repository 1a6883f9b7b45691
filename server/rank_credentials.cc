#include "server/rank_credentials.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/grpc_security.h"

namespace momentum::server {
namespace {

constexpr char kPrefix[] = "rank.";
constexpr size_t kPrefixLength = sizeof(kPrefix) - 1;
constexpr size_t kIdLength = 16;
constexpr size_t kSecretLength = 64;

bool IsHex(const std::string& s, size_t from, size_t n) {
  if (s.size() < from + n) return false;
  for (size_t i = from; i < from + n; ++i) {
    const char c = s[i];
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

}  // namespace

bool RankCredentials::LooksLikeOne(const std::string& token) {
  return token.size() == kPrefixLength + kIdLength + 1 + kSecretLength &&
         token.compare(0, kPrefixLength, kPrefix) == 0 &&
         IsHex(token, kPrefixLength, kIdLength) &&
         token[kPrefixLength + kIdLength] == '.' &&
         IsHex(token, kPrefixLength + kIdLength + 1, kSecretLength);
}

absl::StatusOr<std::vector<std::string>> RankCredentials::Issue(
    const std::string& job_id, int64_t attempt, int64_t world_size) {
  // Made outside the lock: reading /dev/urandom may take a while.
  std::vector<std::pair<std::string, std::string>> made;  // id, secret
  made.reserve(static_cast<size_t>(world_size));
  for (int64_t r = 0; r < world_size; ++r) {
    absl::StatusOr<std::string> id = RandomToken();
    if (!id.ok()) return id.status();
    absl::StatusOr<std::string> secret = RandomToken();
    if (!secret.ok()) return secret.status();
    made.emplace_back(id->substr(0, kIdLength), *std::move(secret));
  }
  std::vector<std::string> tokens;
  tokens.reserve(made.size());
  absl::MutexLock lock(&mu_);
  std::vector<std::string>& ids = by_launch_[{job_id, attempt}];
  for (int64_t r = 0; r < world_size; ++r) {
    auto& [id, secret] = made[static_cast<size_t>(r)];
    // 64 random bits: a clash is (almost) impossible, but never reuse one.
    while (by_id_.count(id) > 0) {
      absl::StatusOr<std::string> again = RandomToken();
      if (!again.ok()) return again.status();
      id = again->substr(0, kIdLength);
    }
    tokens.push_back(absl::StrCat(kPrefix, id, ".", secret));
    by_id_[id] = Entry{secret, RankKey{job_id, attempt, r}};
    ids.push_back(id);
  }
  return tokens;
}

std::optional<RankKey> RankCredentials::Find(const std::string& token) const {
  if (!LooksLikeOne(token)) return std::nullopt;
  const std::string id = token.substr(kPrefixLength, kIdLength);
  const std::string secret = token.substr(kPrefixLength + kIdLength + 1);
  absl::MutexLock lock(&mu_);
  auto it = by_id_.find(id);
  if (it == by_id_.end()) return std::nullopt;
  if (!ConstantTimeEquals(it->second.secret, secret)) return std::nullopt;
  return it->second.key;
}

void RankCredentials::Revoke(const std::string& job_id, int64_t attempt) {
  absl::MutexLock lock(&mu_);
  auto it = by_launch_.find({job_id, attempt});
  if (it == by_launch_.end()) return;
  for (const std::string& id : it->second) by_id_.erase(id);
  by_launch_.erase(it);
}

void RankCredentials::RevokeAll() {
  absl::MutexLock lock(&mu_);
  by_id_.clear();
  by_launch_.clear();
}

size_t RankCredentials::size() const {
  absl::MutexLock lock(&mu_);
  return by_id_.size();
}

absl::Status MayReportAs(const RankKey& key, const std::string& job_id,
                         int64_t attempt, int64_t rank) {
  if (key == RankKey{job_id, attempt, rank}) return absl::OkStatus();
  return absl::PermissionDeniedError(absl::StrCat(
      "this credential is for rank ", key.rank, " of ", key.job_id,
      " (attempt ", key.attempt, "); it may not report for rank ", rank,
      " of \"", job_id.substr(0, 64), "\" (attempt ", attempt, ")"));
}

}  // namespace momentum::server
