// What the server accepts beyond a valid spec: its limits (ranks per job)
// and path roots (where data may be read and outputs written). Pure: no
// state, no I/O but resolving symlinks of the paths it checks.
//
//   Admission admission({.max_ranks_per_job = 8, .data_roots = {"/data"}});
//   MOMENTUM_RETURN_IF_ERROR(admission.Check(spec));
#ifndef MOMENTUM_SERVER_ADMISSION_H_
#define MOMENTUM_SERVER_ADMISSION_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "common/job_spec.h"

namespace momentum::server {

struct AdmissionOptions {
  // Most ranks one job may ask for; 0: no limit beyond the spec's own.
  int64_t max_ranks_per_job = 0;
  // When not empty, a spec's data.path and an absolute output_dir must lie
  // under one of these (symlinks resolved).
  std::vector<std::string> data_roots;
  std::vector<std::string> output_roots;
};

class Admission {
 public:
  explicit Admission(AdmissionOptions options) : options_(std::move(options)) {}

  // INVALID_ARGUMENT naming resources.nproc past the limit;
  // PERMISSION_DENIED naming data.path or output_dir outside the roots, or
  // a relative output_dir that leaves the job's folder.
  absl::Status Check(const JobSpec& spec) const;

 private:
  const AdmissionOptions options_;
};

}  // namespace momentum::server

#endif  // MOMENTUM_SERVER_ADMISSION_H_
