// Per-launch credentials of ranks: each launch of a job gives each of its
// ranks a fresh random token that lets it report metrics for that job, that
// launch (attempt) and its own rank number, and nothing else. The
// coordinator issues them when it launches a gang and revokes them when the
// gang ends; InternalService.ReportMetrics looks the caller's token up here.
//
//   RankCredentials credentials;
//   std::vector<std::string> tokens = *credentials.Issue("job-1", 1, 2);
//   credentials.Find(tokens[1]);  // {"job-1", 1, 1}
//   credentials.Revoke("job-1", 1);
//   credentials.Find(tokens[1]);  // nullopt
//
// Thread-safe: the loop thread issues and revokes, RPC threads look up; one
// absl::Mutex, held for map operations only (token generation happens
// outside it).
#ifndef MOMENTUM_SERVER_RANK_CREDENTIALS_H_
#define MOMENTUM_SERVER_RANK_CREDENTIALS_H_

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace momentum::server {

// What one credential may speak for.
struct RankKey {
  std::string job_id;
  int64_t attempt = 0;
  int64_t rank = 0;
  bool operator==(const RankKey& o) const {
    return job_id == o.job_id && attempt == o.attempt && rank == o.rank;
  }
};

class RankCredentials {
 public:
  // Tokens for ranks 0..world_size-1 of the job's `attempt`, by rank. A
  // token is "rank.<id>.<secret>": the id (16 hex digits) finds the entry,
  // the secret (64 hex digits) is compared in constant time. UNAVAILABLE
  // when no randomness can be read; nothing is issued then.
  absl::StatusOr<std::vector<std::string>> Issue(const std::string& job_id,
                                                 int64_t attempt,
                                                 int64_t world_size);
  // Whom `token` speaks for; nullopt when it was never issued, is revoked,
  // or is malformed.
  std::optional<RankKey> Find(const std::string& token) const;
  // Revokes every credential of the job's `attempt`.
  void Revoke(const std::string& job_id, int64_t attempt);
  // Revokes them all (the coordinator shuts down).
  void RevokeAll();
  // Credentials in force.
  size_t size() const;

  // Whether `token` has the shape of a rank credential (not whether it is
  // valid): callers tell it apart from the token file's tokens with this.
  static bool LooksLikeOne(const std::string& token);

 private:
  struct Entry {
    std::string secret;
    RankKey key;
  };
  mutable absl::Mutex mu_;
  std::map<std::string, Entry> by_id_ ABSL_GUARDED_BY(mu_);
  // (job, attempt) -> the ids issued for it.
  std::map<std::pair<std::string, int64_t>, std::vector<std::string>> by_launch_
      ABSL_GUARDED_BY(mu_);
};

// The rank credential's role in the authorization matrix, given the hello a
// rank sends: OK when `key` is for exactly that job, attempt and rank; else
// PERMISSION_DENIED naming what the credential is for and what was claimed.
absl::Status MayReportAs(const RankKey& key, const std::string& job_id,
                         int64_t attempt, int64_t rank);

}  // namespace momentum::server

#endif  // MOMENTUM_SERVER_RANK_CREDENTIALS_H_
