#include "server/admission.h"

#include <algorithm>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace momentum::server {
namespace {

namespace fs = std::filesystem;

// `path` with symlinks resolved as far as it exists.
fs::path Resolved(const std::string& path) {
  std::error_code ec;
  fs::path p = fs::weakly_canonical(fs::absolute(path), ec);
  return ec ? fs::absolute(path).lexically_normal() : p;
}

bool Under(const fs::path& path, const fs::path& root) {
  auto [r, p] =
      std::mismatch(root.begin(), root.end(), path.begin(), path.end());
  return r == root.end();
}

absl::Status CheckUnderRoots(const std::string& field, const std::string& path,
                             const std::vector<std::string>& roots) {
  if (roots.empty()) return absl::OkStatus();
  const fs::path resolved = Resolved(path);
  for (const std::string& root : roots) {
    if (Under(resolved, Resolved(root))) return absl::OkStatus();
  }
  std::string list;
  for (const std::string& root : roots) {
    absl::StrAppend(&list, list.empty() ? "" : ", ", root);
  }
  return absl::PermissionDeniedError(absl::StrCat(
      field, " must lie under one of the server's roots (", list, "), got ",
      path, resolved.string() != path ? " (" + resolved.string() + ")" : ""));
}

}  // namespace

absl::Status Admission::Check(const JobSpec& spec) const {
  if (options_.max_ranks_per_job > 0 &&
      spec.resources.nproc > options_.max_ranks_per_job) {
    return absl::InvalidArgumentError(
        absl::StrCat("resources.nproc must be <= ", options_.max_ranks_per_job,
                     " on this server, got ", spec.resources.nproc));
  }
  MOMENTUM_RETURN_IF_ERROR(
      CheckUnderRoots("data.path", spec.data.path, options_.data_roots));
  if (fs::path(spec.output_dir).is_absolute()) {
    MOMENTUM_RETURN_IF_ERROR(
        CheckUnderRoots("output_dir", spec.output_dir, options_.output_roots));
  } else if (fs::path(spec.output_dir)
                 .lexically_normal()
                 .string()
                 .rfind("..", 0) == 0) {
    return absl::PermissionDeniedError(absl::StrCat(
        "output_dir must stay inside the job's folder, got ", spec.output_dir));
  }
  return absl::OkStatus();
}

}  // namespace momentum::server
