// Where a rank trains: resolves resources.device, resources.backend and
// resources.precision of a job spec for one rank, and the scoped settings
// that go with them (autocast to bfloat16, cuDNN benchmark mode).
//
// Each rank owns one GPU. Which one: the only one visible when the launcher
// set CUDA_VISIBLE_DEVICES to one index (the coordinator does), otherwise
// the rank's LOCAL_RANK (torchrun's convention).
//
// Usage:
//   MOMENTUM_ASSIGN_OR_RETURN(RankDevice where,
//                             ResolveRankDevice(spec.resources, local_rank));
//   model.to(where.device);
//   { AutocastScope bf16(where); logits = encoder->forward(x); }
#ifndef MOMENTUM_WORKER_DEVICE_H_
#define MOMENTUM_WORKER_DEVICE_H_

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "common/job_spec.h"

namespace momentum::worker {

struct RankDevice {
  c10::Device device = c10::Device(c10::kCPU);
  std::string backend = "gloo";  // the process group's: gloo | nccl
  bool bf16 = false;             // resources.precision bf16
};

// CUDA devices this process sees: 0 in a build without CUDA or on a machine
// without a GPU.
int64_t VisibleCudaDevices();

// Resolves `resources` for the rank with `local_rank` on a machine that
// shows `cuda_devices` GPUs to it (VisibleCudaDevices() by default).
// device auto is cuda when a GPU is visible; backend auto is NCCL on CUDA
// and Gloo on the CPU. INVALID_ARGUMENT names the field and the rule, e.g.
//   resources.device cuda: no CUDA device is visible to this rank
absl::StatusOr<RankDevice> ResolveRankDevice(const ResourcesSpec& resources,
                                             int64_t local_rank,
                                             int64_t cuda_devices = -1);

// Makes CUDA the current device and sets the per-process switches a run on
// it wants: cuDNN benchmark mode (fixed shapes); TF32 off in fp32, so that
// fp32 means float32 arithmetic as on the CPU. No-op on the CPU.
void PrepareDevice(const RankDevice& where);

// While alive, autocasts convolutions and matrix products on `where`'s
// device type to bfloat16 when `where.bf16` (nothing otherwise). One thread.
class AutocastScope {
 public:
  explicit AutocastScope(const RankDevice& where);
  ~AutocastScope();
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  bool active_ = false;
  c10::DeviceType type_ = c10::kCPU;
  bool was_enabled_ = false;
  c10::ScalarType was_dtype_ = c10::kBFloat16;
};

}  // namespace momentum::worker

#endif  // MOMENTUM_WORKER_DEVICE_H_
