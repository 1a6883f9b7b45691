// GPUs as a resource the coordinator places: the `--gpus` flag of
// momentum-server and momentum-agent, how a node's NVIDIA GPUs are found
// without linking CUDA, and what a job spec's `resources.device: auto`
// becomes at submission.
//
// GPUs are named by their CUDA index on their machine; a rank that owns GPU
// 3 runs with CUDA_VISIBLE_DEVICES=3 and sees it as its device 0.
//
//   absl::StatusOr<std::vector<int>> gpus = ParseGpusFlag("auto");
//   if (!gpus.ok()) return Fail(gpus.status());  // names --gpus
//   ...
//   MOMENTUM_RETURN_IF_ERROR(ResolveDevice(cluster_gpus, &spec));
#ifndef MOMENTUM_SERVER_GPUS_H_
#define MOMENTUM_SERVER_GPUS_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/job_spec.h"

namespace momentum::server {

// The help of --gpus, the same on momentum-server and momentum-agent.
inline constexpr char kGpusFlagHelp[] =
    "GPUs this machine offers, one per rank of a CUDA job (such a rank takes "
    "a GPU, not a slot): auto (its NVIDIA GPUs, as CUDA_VISIBLE_DEVICES "
    "limits them), none, or CUDA indices such as 0,1,3";

// Where DetectGpus looks. The defaults are this machine's; tests point them
// at folders of their own.
struct GpuProbe {
  // Holds a device file nvidia<N> per GPU the process may open (in a
  // container: the GPUs it was given).
  std::string dev_dir = "/dev";
  // The driver's folder, one entry per GPU (named by PCI bus id); used when
  // no device file exists yet (the driver makes them on first use).
  std::string proc_dir = "/proc/driver/nvidia/gpus";
  // CUDA_VISIBLE_DEVICES of this process; nullopt when it is not set.
  std::optional<std::string> visible_devices;

  // The defaults, with CUDA_VISIBLE_DEVICES from the environment.
  static GpuProbe FromEnvironment();
};

// The CUDA indices of this machine's NVIDIA GPUs: 0..N-1 for N device files
// (else N driver entries), or, when CUDA_VISIBLE_DEVICES is set, the indices
// it lists, in its order, up to the first one that is negative or not below
// N (where CUDA stops reading it too); empty when it is set but empty.
// INVALID_ARGUMENT when it lists something other than an index (a GPU UUID,
// a MIG instance) or an index twice. Never fails for a machine without GPUs.
absl::StatusOr<std::vector<int>> DetectGpus(const GpuProbe& probe);

// The value of --gpus (`flag` names it in errors, e.g. "--gpus"): "auto"
// (DetectGpus), "none", or a comma list of distinct GPU indices >= 0 such as
// "0,1,3". INVALID_ARGUMENT naming the flag and the rule otherwise.
absl::StatusOr<std::vector<int>> ParseGpusFlag(
    const std::string& value, const std::string& flag = "--gpus",
    const GpuProbe& probe = GpuProbe::FromEnvironment());

// OK when every index is >= 0 and none appears twice; else INVALID_ARGUMENT
// that names `what` (e.g. "AgentHello.gpus").
absl::Status CheckGpuIndices(const std::vector<int>& gpus,
                             const std::string& what);

// "0,1,3", or "none" for no GPUs: for logs and messages.
std::string GpuList(const std::vector<int>& gpus);

// Resolves the spec's `resources.device` for a cluster that has
// `cluster_gpus` GPUs (used or free, on every launcher): auto becomes cuda
// when there is at least one, else cpu. A CUDA job's ranks each own one GPU,
// so a job that asks for more ranks than the cluster has GPUs (or for cuda
// where there are none) is INVALID_ARGUMENT naming resources.nproc; so is
// resources.backend nccl when auto resolves to cpu.
absl::Status ResolveDevice(int64_t cluster_gpus, JobSpec* spec);

}  // namespace momentum::server

#endif  // MOMENTUM_SERVER_GPUS_H_
