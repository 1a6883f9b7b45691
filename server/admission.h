// What the server accepts beyond a valid spec: its limits (ranks per job)
// and path roots (where data may be read and outputs written). Pure: no
// state, no I/O but resolving symlinks of the paths it checks.
//
//   Admission admission({.max_ranks_per_job = 8, .data_roots = {"/data"},
//                        .output_root = "/srv/momentum/outputs"});
//   MOMENTUM_RETURN_IF_ERROR(admission.Check(spec));
//   MOMENTUM_ASSIGN_OR_RETURN(std::string out,
//       admission.ResolveOutputDir(spec.output_dir, "alice", false));
//   // "runs/x" -> "/srv/momentum/outputs/alice/runs/x"
#ifndef MOMENTUM_SERVER_ADMISSION_H_
#define MOMENTUM_SERVER_ADMISSION_H_

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/job_spec.h"

namespace momentum::server {

struct AdmissionOptions {
  // Most ranks one job may ask for; 0: no limit beyond the spec's own.
  int64_t max_ranks_per_job = 0;
  // When not empty, a spec's data.path must lie under one of these
  // (symlinks resolved).
  std::vector<std::string> data_roots;
  // Every submitter has a folder of its own here, <output_root>/<folder>
  // (OwnerFolder), which holds its relative output_dirs. The coordinator
  // makes it <state_dir>/outputs when empty.
  std::string output_root;
  // (user, dir): `user` may also write an absolute output_dir under `dir`.
  // Admins may write under any of these dirs and anywhere under
  // output_root.
  std::vector<std::pair<std::string, std::string>> user_output_roots;
};

// The name of `owner`'s folder under the output root: the name itself when
// it is made of letters, digits, '-', '_', '.' and '@' and starts with
// neither '.' nor '_'; otherwise those bytes are written %XX (uppercase
// hex), as is '%'. So every name is one path component, never "." or "..",
// and two names never share a folder. An anonymous owner ("") has
// "_anonymous", which no name encodes to. PERMISSION_DENIED when the folder
// name would be longer than 255 bytes.
//   "alice" -> "alice", "a/b" -> "a%2Fb", ".." -> "%2E.", "" -> "_anonymous"
absl::StatusOr<std::string> OwnerFolder(const std::string& owner);

class Admission {
 public:
  explicit Admission(AdmissionOptions options) : options_(std::move(options)) {}

  // INVALID_ARGUMENT naming resources.nproc past the limit;
  // PERMISSION_DENIED naming data.path outside the data roots.
  absl::Status Check(const JobSpec& spec) const;

  // Where a job of `owner` with this output_dir writes: an absolute path
  // with symlinks resolved as far as it exists. A relative output_dir
  // lives in the owner's folder, <output_root>/<OwnerFolder(owner)>/<dir>,
  // and may not climb out of it with "..". The resolved path must lie under
  // the owner's folder or one of its user_output_roots; for an admin, under
  // output_root or any of the user_output_roots. The folder itself is not
  // resolved: were it a symlink, what it points to is refused. Errors
  // (PERMISSION_DENIED, INVALID_ARGUMENT when empty) name output_dir, the
  // rule and the value. The coordinator calls it at submission and again
  // at every launch, with the path it returned the first time.
  absl::StatusOr<std::string> ResolveOutputDir(const std::string& output_dir,
                                               const std::string& owner,
                                               bool admin) const;

 private:
  const AdmissionOptions options_;
};

}  // namespace momentum::server

#endif  // MOMENTUM_SERVER_ADMISSION_H_
