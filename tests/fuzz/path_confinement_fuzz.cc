// libFuzzer target: the server's path confinement (server/admission.h): a
// spec's data.path (Admission::Check), a submitter's folder (OwnerFolder)
// and where its output_dir resolves (ResolveOutputDir), over a folder tree
// with symlinks that point in, out, across users, nowhere and in circles:
//   base/data/a/                 a data root's folder
//   base/data/a/in   -> ../a     a link that stays inside
//   base/data/a/out  -> ../../outside
//   base/data/loop   -> loop
//   base/out/                    the output root
//   base/out/alice/tobob   -> ../bob        into another user's folder
//   base/out/alice/escape  -> ../../outside
//   base/out/alice/later   -> ../bob/later  dangling, into bob's
//   base/out/alice/loop    -> loop
//   base/out/bob/
//   base/bobroot/                bob's --user-output-root
//   base/outside/secret
// Input: up to three lines: data.path, output_dir, owner (paths with
// control characters are skipped: the spec refuses them). A data.path not
// starting with '/' is taken under base; an output_dir starting with '@'
// is made absolute under base (else used as given: relative to the
// owner's folder); an owner starting with '!' is an admin (the rest is its
// name). Properties: a refusal names its field (data.path:
// PERMISSION_DENIED; output_dir, or a submitter's name too long for a
// folder: PERMISSION_DENIED or INVALID_ARGUMENT);
// an owner's folder is one path component; an accepted output_dir is
// absolute and, resolved with realpath(3) as far as it exists (not with
// the code's own resolution), lies in the owner's folder or bob's root --
// for an admin, under the output root or bob's root; an accepted data.path
// that exists resolves under the data root.
#include <limits.h>
#include <stdlib.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "common/job_spec.h"
#include "server/admission.h"

namespace {

namespace fs = std::filesystem;

struct Tree {
  std::string base;
  momentum::server::Admission admission{{}};
};

const Tree& TheTree() {
  static const Tree* tree = [] {
    char pattern[] = "/tmp/path_confinement_fuzz.XXXXXX";
    if (::mkdtemp(pattern) == nullptr) std::abort();
    const fs::path base = pattern;
    std::atexit([] { fs::remove_all(TheTree().base); });
    for (const char* dir :
         {"data/a", "out/alice", "out/bob", "bobroot", "outside"}) {
      fs::create_directories(base / dir);
    }
    fs::create_symlink("../a", base / "data/a/in");
    fs::create_symlink("../../outside", base / "data/a/out");
    fs::create_symlink("loop", base / "data/loop");
    fs::create_symlink("../bob", base / "out/alice/tobob");
    fs::create_symlink("../../outside", base / "out/alice/escape");
    fs::create_symlink("../bob/later", base / "out/alice/later");
    fs::create_symlink("loop", base / "out/alice/loop");
    if (FILE* f = std::fopen((base / "outside/secret").c_str(), "w")) {
      std::fclose(f);
    }
    momentum::server::AdmissionOptions options;
    options.data_roots = {(base / "data").string()};
    options.output_root = (base / "out").string();
    options.user_output_roots = {{"bob", (base / "bobroot").string()}};
    return new Tree{base.string(), momentum::server::Admission(options)};
  }();
  return *tree;
}

// `path` with its longest existing prefix resolved by realpath(3) and the
// rest appended as written, normalised; "" when a prefix cannot be
// resolved (a loop).
std::string Canonical(const fs::path& path) {
  fs::path prefix = path, rest;
  std::error_code ec;
  while (!fs::exists(prefix, ec) && prefix.has_relative_path()) {
    rest = prefix.filename() / rest;
    prefix = prefix.parent_path();
  }
  char resolved[PATH_MAX];
  if (::realpath(prefix.c_str(), resolved) == nullptr) return "";
  return (fs::path(resolved) / rest).lexically_normal().string();
}

bool Under(const std::string& path, const std::string& root) {
  return !path.empty() &&
         (path == root || path.rfind(root + "/", 0) == 0 ||
          (!root.empty() && root.back() == '/' && path.rfind(root, 0) == 0));
}

bool Mentions(const absl::Status& status, const char* field) {
  return status.message().find(field) != absl::string_view::npos;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const Tree& tree = TheTree();
  std::vector<std::string> lines(3);
  size_t at = 0;
  const std::string text(reinterpret_cast<const char*>(data), size);
  for (size_t i = 0; i < 3 && at <= text.size(); ++i) {
    const size_t nl = i == 2 ? std::string::npos : text.find('\n', at);
    lines[i] = text.substr(at, nl == std::string::npos ? nl : nl - at);
    at = nl == std::string::npos ? text.size() + 1 : nl + 1;
  }
  std::string data_path = lines[0], output_dir = lines[1], owner = lines[2];
  if (data_path.empty() || data_path[0] != '/') {
    data_path = tree.base + "/" + data_path;
  }
  if (!output_dir.empty() && output_dir[0] == '@') {
    output_dir = tree.base + "/" + output_dir.substr(1);
  }
  // The spec's validator refuses control characters in both paths before
  // they get here (a NUL would end the path the worker opens early:
  // job_spec_test); the owner may hold any byte (a token file's NAME).
  for (const std::string* path : {&data_path, &output_dir}) {
    for (unsigned char c : *path) {
      if (c < 0x20 || c == 0x7f) return 0;
    }
  }
  const bool admin = !owner.empty() && owner[0] == '!';
  if (admin) owner = owner.substr(1);

  momentum::JobSpec spec;
  spec.data.path = data_path;
  spec.output_dir = output_dir;
  const absl::Status checked = tree.admission.Check(spec);
  if (!checked.ok()) {
    if (!absl::IsPermissionDenied(checked) || !Mentions(checked, "data.path")) {
      std::abort();
    }
  } else if (std::error_code ec;  // a name over 255 bytes: ENAMETOOLONG
             fs::exists(data_path, ec) &&
             !Under(Canonical(data_path), Canonical(tree.base + "/data"))) {
    std::abort();
  }

  absl::StatusOr<std::string> folder = momentum::server::OwnerFolder(owner);
  if (folder.ok() &&
      (folder->empty() || *folder == "." || *folder == ".." ||
       folder->find('/') != std::string::npos || folder->size() > 255)) {
    std::abort();
  }
  absl::StatusOr<std::string> out =
      tree.admission.ResolveOutputDir(output_dir, owner, admin);
  if (!out.ok()) {
    if ((!absl::IsPermissionDenied(out.status()) &&
         !absl::IsInvalidArgument(out.status())) ||
        (!Mentions(out.status(), "output_dir") &&
         !Mentions(out.status(), "submitter's name"))) {
      std::abort();
    }
    return 0;
  }
  if (!folder.ok() || !fs::path(*out).is_absolute()) std::abort();
  const std::string where = Canonical(*out);
  const std::string bobroot = Canonical(tree.base + "/bobroot");
  bool allowed;
  if (admin) {
    allowed =
        Under(where, Canonical(tree.base + "/out")) || Under(where, bobroot);
  } else {
    allowed = Under(where, Canonical(tree.base + "/out/" + *folder)) ||
              (owner == "bob" && Under(where, bobroot));
  }
  if (!allowed) {
    std::fprintf(stderr, "output_dir %s of %s%s resolved to %s (%s)\n",
                 output_dir.c_str(), admin ? "admin " : "", owner.c_str(),
                 out->c_str(), where.c_str());
    std::abort();
  }
  return 0;
}
