#include "server/gpus.h"

#include <cstdlib>
#include <filesystem>
#include <set>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace momentum::server {
namespace {

namespace fs = std::filesystem;

// Entries of `dir` whose name passes `keep`; 0 when it cannot be read.
template <typename Keep>
int CountEntries(const std::string& dir, Keep keep) {
  std::error_code ec;
  int n = 0;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    if (keep(entry.path().filename().string())) ++n;
  }
  return n;
}

// nvidia0, nvidia1, ...: one per GPU (nvidiactl, nvidia-uvm are not GPUs).
bool IsGpuDeviceFile(const std::string& name) {
  const std::string prefix = "nvidia";
  if (name.size() <= prefix.size() || name.rfind(prefix, 0) != 0) return false;
  return name.find_first_not_of("0123456789", prefix.size()) ==
         std::string::npos;
}

// How many GPUs the driver exposes to this process.
int CountGpus(const GpuProbe& probe) {
  const int devices = CountEntries(probe.dev_dir, IsGpuDeviceFile);
  if (devices > 0) return devices;
  return CountEntries(probe.proc_dir, [](const std::string&) { return true; });
}

// The indices in a comma list; `describe` says what the list is, for errors.
absl::StatusOr<std::vector<int>> ParseIndexList(const std::string& list,
                                                const std::string& describe) {
  std::vector<int> out;
  for (absl::string_view item : absl::StrSplit(list, ',')) {
    const std::string text(absl::StripAsciiWhitespace(item));
    int index = 0;
    if (!absl::SimpleAtoi(text, &index)) {
      return absl::InvalidArgumentError(
          absl::StrCat(describe, ": \"", text, "\" is not a GPU index"));
    }
    out.push_back(index);
  }
  return out;
}

}  // namespace

GpuProbe GpuProbe::FromEnvironment() {
  GpuProbe probe;
  if (const char* visible = std::getenv("CUDA_VISIBLE_DEVICES")) {
    probe.visible_devices = visible;
  }
  return probe;
}

absl::StatusOr<std::vector<int>> DetectGpus(const GpuProbe& probe) {
  const int count = CountGpus(probe);
  std::vector<int> gpus;
  if (!probe.visible_devices) {
    for (int i = 0; i < count; ++i) gpus.push_back(i);
    return gpus;
  }
  const std::string visible(absl::StripAsciiWhitespace(*probe.visible_devices));
  if (visible.empty()) return gpus;
  absl::StatusOr<std::vector<int>> listed = ParseIndexList(
      visible,
      absl::StrCat("CUDA_VISIBLE_DEVICES=\"", visible,
                   "\" (name the GPUs to offer by index with --gpus)"));
  if (!listed.ok()) return listed.status();
  // CUDA reads the list up to the first index that names no device.
  for (int index : *listed) {
    if (index < 0 || index >= count) break;
    gpus.push_back(index);
  }
  if (absl::Status s = CheckGpuIndices(
          gpus, absl::StrCat("CUDA_VISIBLE_DEVICES=\"", visible, "\""));
      !s.ok()) {
    return s;
  }
  return gpus;
}

absl::StatusOr<std::vector<int>> ParseGpusFlag(const std::string& value,
                                               const std::string& flag,
                                               const GpuProbe& probe) {
  if (value == "auto") {
    absl::StatusOr<std::vector<int>> detected = DetectGpus(probe);
    if (!detected.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(flag, " auto: ", detected.status().message()));
    }
    return detected;
  }
  if (value == "none") return std::vector<int>();
  const std::string rule = absl::StrCat(
      flag,
      " must be auto, none or a comma list of distinct GPU indices >= 0 "
      "(e.g. 0,1,3), got \"",
      value, "\"");
  absl::StatusOr<std::vector<int>> gpus = ParseIndexList(value, rule);
  if (!gpus.ok()) return gpus.status();
  if (absl::Status s = CheckGpuIndices(*gpus, rule); !s.ok()) return s;
  return gpus;
}

absl::Status CheckGpuIndices(const std::vector<int>& gpus,
                             const std::string& what) {
  std::set<int> seen;
  for (int index : gpus) {
    if (index < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": GPU index ", index, " is negative"));
    }
    if (!seen.insert(index).second) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": GPU ", index, " is listed twice"));
    }
  }
  return absl::OkStatus();
}

std::string GpuList(const std::vector<int>& gpus) {
  return gpus.empty() ? "none" : absl::StrJoin(gpus, ",");
}

absl::Status ResolveDevice(int64_t cluster_gpus, JobSpec* spec) {
  ResourcesSpec& resources = spec->resources;
  const std::string asked = resources.device;
  if (asked == "auto") resources.device = cluster_gpus > 0 ? "cuda" : "cpu";
  if (resources.device == "cpu") {
    if (resources.backend == "nccl") {
      return absl::InvalidArgumentError(
          "resources.backend nccl requires resources.device cuda, but "
          "resources.device auto is cpu here: the cluster has no GPUs");
    }
    return absl::OkStatus();
  }
  if (resources.nproc <= cluster_gpus) return absl::OkStatus();
  // Each rank owns one GPU.
  return absl::InvalidArgumentError(absl::StrCat(
      "resources.nproc ", resources.nproc, " asks for ", resources.nproc,
      resources.nproc == 1 ? " GPU" : " GPUs", " (resources.device ", asked,
      asked == "auto" ? ", which is cuda on a cluster with GPUs" : "",
      "), but the cluster has ",
      cluster_gpus > 0 ? absl::StrCat(cluster_gpus) : std::string("none"),
      asked == "auto" ? "; set resources.device cpu to run on CPU slots" : ""));
}

}  // namespace momentum::server
