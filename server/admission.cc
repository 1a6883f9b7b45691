#include "server/admission.h"

#include <algorithm>
#include <deque>
#include <filesystem>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status_macros.h"

namespace momentum::server {
namespace {

namespace fs = std::filesystem;

// Normal form, without a trailing separator ("/a/b/" -> "/a/b").
fs::path Clean(const fs::path& path) {
  fs::path p = path.lexically_normal();
  if (p.has_relative_path() && !p.has_filename()) p = p.parent_path();
  return p;
}

// `path` made absolute, with every symlink on it resolved, as the kernel
// would when the path is opened: unlike std::filesystem::weakly_canonical,
// a dangling symlink is followed too (its target may come to exist before
// the job writes), and ".." after a symlink goes up from where it points.
// PERMISSION_DENIED naming `field` on a symlink loop.
absl::StatusOr<fs::path> Resolved(const fs::path& path,
                                  const std::string& field) {
  constexpr int kMaxLinks = 40;  // Linux's MAXSYMLINKS
  const fs::path absolute = fs::absolute(path);
  const fs::path relative = absolute.relative_path();
  std::deque<fs::path> pending(relative.begin(), relative.end());
  fs::path out = absolute.root_path();
  int links = 0;
  while (!pending.empty()) {
    const fs::path part = pending.front();
    pending.pop_front();
    if (part.empty() || part == ".") continue;
    if (part == "..") {
      out = out.parent_path();
      continue;
    }
    const fs::path next = out / part;
    std::error_code ec;
    if (!fs::is_symlink(fs::symlink_status(next, ec)) || ec) {
      out = next;
      continue;
    }
    const fs::path target = fs::read_symlink(next, ec);
    if (ec || ++links > kMaxLinks) {
      return absl::PermissionDeniedError(absl::StrCat(
          field, " must resolve to a folder, got ", path.string(), " (",
          ec ? "cannot read the symlink " + next.string() + ": " + ec.message()
             : "too many levels of symlinks",
          ")"));
    }
    const fs::path rest = target.relative_path();
    pending.insert(pending.begin(), rest.begin(), rest.end());
    if (target.is_absolute()) out = target.root_path();
  }
  return Clean(out);
}

bool Under(const fs::path& path, const fs::path& root) {
  auto [r, p] =
      std::mismatch(root.begin(), root.end(), path.begin(), path.end());
  return r == root.end();
}

std::string List(const std::vector<fs::path>& paths) {
  std::string list;
  for (const fs::path& p : paths) {
    absl::StrAppend(&list, list.empty() ? "" : ", ", p.string());
  }
  return list;
}

absl::Status CheckUnderRoots(const std::string& field, const std::string& path,
                             const std::vector<std::string>& roots) {
  if (roots.empty()) return absl::OkStatus();
  MOMENTUM_ASSIGN_OR_RETURN(const fs::path resolved, Resolved(path, field));
  std::vector<fs::path> resolved_roots;
  for (const std::string& root : roots) {
    absl::StatusOr<fs::path> resolved_root = Resolved(root, "a root");
    if (resolved_root.ok() && Under(resolved, *resolved_root)) {
      return absl::OkStatus();
    }
    resolved_roots.push_back(root);
  }
  return absl::PermissionDeniedError(absl::StrCat(
      field, " must lie under one of the server's roots (",
      List(resolved_roots), "), got ", path,
      resolved.string() != path ? " (" + resolved.string() + ")" : ""));
}

}  // namespace

absl::StatusOr<std::string> OwnerFolder(const std::string& owner) {
  if (owner.empty()) return std::string("_anonymous");
  std::string folder;
  for (size_t i = 0; i < owner.size(); ++i) {
    const char c = owner[i];
    const bool plain = absl::ascii_isalnum(static_cast<unsigned char>(c)) ||
                       c == '-' || c == '@' ||
                       ((c == '.' || c == '_') && i > 0);
    if (plain) {
      folder.push_back(c);
    } else {
      absl::StrAppendFormat(&folder, "%%%02X", static_cast<unsigned char>(c));
    }
  }
  if (folder.size() > 255) {
    return absl::PermissionDeniedError(absl::StrCat(
        "the submitter's name is too long to name an output folder (",
        folder.size(), " bytes encoded, at most 255): ", owner.substr(0, 64),
        "..."));
  }
  return folder;
}

absl::Status Admission::Check(const JobSpec& spec) const {
  if (options_.max_ranks_per_job > 0 &&
      spec.resources.nproc > options_.max_ranks_per_job) {
    return absl::InvalidArgumentError(
        absl::StrCat("resources.nproc must be <= ", options_.max_ranks_per_job,
                     " on this server, got ", spec.resources.nproc));
  }
  return CheckUnderRoots("data.path", spec.data.path, options_.data_roots);
}

absl::StatusOr<std::string> Admission::ResolveOutputDir(
    const std::string& output_dir, const std::string& owner, bool admin) const {
  if (output_dir.empty()) {
    return absl::InvalidArgumentError("output_dir must not be empty");
  }
  MOMENTUM_ASSIGN_OR_RETURN(const std::string folder, OwnerFolder(owner));
  MOMENTUM_ASSIGN_OR_RETURN(const fs::path root,
                            Resolved(options_.output_root, "the output root"));
  // Not resolved: a symlink in its place must not move the owner's folder.
  const fs::path own = root / folder;
  fs::path wanted(output_dir);
  if (!wanted.is_absolute()) {
    const fs::path relative = wanted.lexically_normal();
    if (!relative.empty() && *relative.begin() == "..") {
      return absl::PermissionDeniedError(absl::StrCat(
          "output_dir must stay inside the submitter's folder ", own.string(),
          " (a relative output_dir may not climb out with \"..\"), got ",
          output_dir));
    }
    wanted = own / relative;
  }
  MOMENTUM_ASSIGN_OR_RETURN(const fs::path resolved,
                            Resolved(wanted, "output_dir"));
  std::vector<fs::path> allowed = {admin ? root : own};
  for (const auto& [user, dir] : options_.user_output_roots) {
    if (!admin && user != owner) continue;
    MOMENTUM_ASSIGN_OR_RETURN(fs::path resolved_dir,
                              Resolved(dir, "--user-output-root " + user));
    allowed.push_back(std::move(resolved_dir));
  }
  for (const fs::path& r : allowed) {
    if (Under(resolved, r)) return resolved.string();
  }
  return absl::PermissionDeniedError(absl::StrCat(
      "output_dir must lie under ",
      allowed.size() == 1 ? allowed[0].string() : "one of " + List(allowed),
      " for ", owner.empty() ? "anonymous callers" : owner, ", got ",
      output_dir,
      resolved.string() != output_dir
          ? " (which resolves to " + resolved.string() + ")"
          : ""));
}

}  // namespace momentum::server
