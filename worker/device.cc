#include "worker/device.h"

#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/cuda.h>

#include <cstdlib>

#include "absl/strings/str_cat.h"

namespace momentum::worker {
namespace {

std::string VisibleDevicesNote() {
  const char* visible = std::getenv("CUDA_VISIBLE_DEVICES");
  return visible == nullptr
             ? std::string("CUDA_VISIBLE_DEVICES unset")
             : absl::StrCat("CUDA_VISIBLE_DEVICES=\"", visible, "\"");
}

}  // namespace

int64_t VisibleCudaDevices() {
  return static_cast<int64_t>(torch::cuda::device_count());
}

absl::StatusOr<RankDevice> ResolveRankDevice(const ResourcesSpec& resources,
                                             int64_t local_rank,
                                             int64_t cuda_devices) {
  if (cuda_devices < 0) cuda_devices = VisibleCudaDevices();
  RankDevice where;
  where.bf16 = resources.precision == "bf16";
  const std::string& device = resources.device;
  if (device != "auto" && device != "cpu" && device != "cuda") {
    return absl::InvalidArgumentError(
        absl::StrCat("resources.device must be one of auto, cpu, cuda, got \"",
                     device, "\""));
  }
  const bool cuda = device == "cuda" || (device == "auto" && cuda_devices > 0);
  if (cuda) {
    if (cuda_devices == 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "resources.device cuda: no CUDA device is visible to this rank (",
          VisibleDevicesNote(),
#ifdef MOMENTUM_WITH_CUDA
          ")"
#else
          "; this momentum-worker was built without CUDA)"
#endif
          ));
    }
    // One visible GPU is this rank's (the coordinator hands each rank its
    // own); several are shared by the ranks on the machine by local rank.
    const int64_t index = cuda_devices == 1 ? 0 : local_rank;
    if (index >= cuda_devices) {
      return absl::InvalidArgumentError(absl::StrCat(
          "resources.device cuda: local rank ", local_rank,
          " has no GPU of its own, ", cuda_devices, " are visible (",
          VisibleDevicesNote(), "); each rank needs one"));
    }
    where.device =
        c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(index));
  }
  const std::string& backend = resources.backend;
  if (backend == "auto") {
    where.backend = cuda ? "nccl" : "gloo";
  } else if (backend == "nccl" && !cuda) {
    return absl::InvalidArgumentError(absl::StrCat(
        "resources.backend nccl needs a CUDA device, but resources.device ",
        device, " resolved to the CPU (", VisibleDevicesNote(), ")"));
  } else if (backend != "gloo" && backend != "nccl") {
    return absl::InvalidArgumentError(absl::StrCat(
        "resources.backend must be one of auto, gloo, nccl, got \"", backend,
        "\""));
  } else {
    where.backend = backend;
  }
  return where;
}

void PrepareDevice(const RankDevice& where) {
  if (!where.device.is_cuda()) return;
  c10::impl::getDeviceGuardImpl(c10::kCUDA)->setDevice(where.device);
  at::Context& context = at::globalContext();
  context.setBenchmarkCuDNN(true);
  if (!where.bf16) {
    context.setAllowTF32CuDNN(false);
    context.setAllowTF32CuBLAS(false);
  }
}

AutocastScope::AutocastScope(const RankDevice& where) {
  if (!where.bf16) return;
  active_ = true;
  type_ = where.device.type();
  was_enabled_ = at::autocast::is_autocast_enabled(type_);
  was_dtype_ = at::autocast::get_autocast_dtype(type_);
  at::autocast::set_autocast_enabled(type_, true);
  at::autocast::set_autocast_dtype(type_, at::kBFloat16);
  at::autocast::increment_nesting();
}

AutocastScope::~AutocastScope() {
  if (!active_) return;
  // The outermost scope drops the casts of the weights it cached.
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  at::autocast::set_autocast_enabled(type_, was_enabled_);
  at::autocast::set_autocast_dtype(type_, was_dtype_);
}

}  // namespace momentum::worker
