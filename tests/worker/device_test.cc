#include "worker/device.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>

namespace momentum::worker {
namespace {

ResourcesSpec Resources(const std::string& device, const std::string& backend,
                        const std::string& precision = "fp32") {
  ResourcesSpec r;
  r.device = device;
  r.backend = backend;
  r.precision = precision;
  return r;
}

// Resolves with a given number of visible GPUs; the error text otherwise.
std::string Error(const ResourcesSpec& r, int64_t local_rank, int64_t gpus) {
  auto where = ResolveRankDevice(r, local_rank, gpus);
  EXPECT_FALSE(where.ok());
  return where.ok() ? "" : std::string(where.status().message());
}

TEST(ResolveRankDeviceTest, AutoIsTheGpuWhenOneIsVisible) {
  auto cpu = ResolveRankDevice(Resources("auto", "auto"), 0, 0);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  EXPECT_TRUE(cpu->device.is_cpu());
  EXPECT_EQ(cpu->backend, "gloo");
  EXPECT_FALSE(cpu->bf16);

  auto gpu = ResolveRankDevice(Resources("auto", "auto", "bf16"), 0, 1);
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  EXPECT_EQ(gpu->device, c10::Device(c10::kCUDA, 0));
  EXPECT_EQ(gpu->backend, "nccl");
  EXPECT_TRUE(gpu->bf16);

  auto forced = ResolveRankDevice(Resources("cpu", "auto"), 0, 4);
  ASSERT_TRUE(forced.ok());
  EXPECT_TRUE(forced->device.is_cpu());
  EXPECT_EQ(forced->backend, "gloo");
}

// One visible GPU is the rank's own (the coordinator's CUDA_VISIBLE_DEVICES);
// with several, the local rank picks one.
TEST(ResolveRankDeviceTest, EachRankOwnsOneGpu) {
  auto only = ResolveRankDevice(Resources("cuda", "auto"), 3, 1);
  ASSERT_TRUE(only.ok()) << only.status();
  EXPECT_EQ(only->device, c10::Device(c10::kCUDA, 0));
  auto second = ResolveRankDevice(Resources("cuda", "auto"), 1, 2);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(second->device, c10::Device(c10::kCUDA, 1));
  EXPECT_NE(Error(Resources("cuda", "auto"), 2, 2)
                .find("resources.device cuda: local rank 2 has no GPU of its "
                      "own, 2 are visible"),
            std::string::npos);
}

TEST(ResolveRankDeviceTest, RefusesWhatCannotRun) {
  EXPECT_NE(Error(Resources("cuda", "auto"), 0, 0)
                .find("resources.device cuda: no CUDA device is visible to "
                      "this rank"),
            std::string::npos);
  EXPECT_NE(Error(Resources("auto", "nccl"), 0, 0)
                .find("resources.backend nccl needs a CUDA device"),
            std::string::npos);
  EXPECT_NE(Error(Resources("tpu", "auto"), 0, 0)
                .find("resources.device must be one of auto, cpu, cuda"),
            std::string::npos);
  // Gloo over CUDA tensors is allowed (two ranks on one GPU).
  auto gloo = ResolveRankDevice(Resources("cuda", "gloo"), 0, 1);
  ASSERT_TRUE(gloo.ok());
  EXPECT_EQ(gloo->backend, "gloo");
}

// This machine's own answer agrees with LibTorch's.
TEST(ResolveRankDeviceTest, CountsTheVisibleGpus) {
  EXPECT_EQ(VisibleCudaDevices(),
            static_cast<int64_t>(torch::cuda::device_count()));
}

// bf16 autocasts a convolution's output to bfloat16 inside the scope and
// restores the previous state after it; fp32 changes nothing.
TEST(AutocastScopeTest, Bf16OnlyInsideTheScope) {
  torch::nn::Conv2d conv(torch::nn::Conv2dOptions(3, 4, 3));
  const at::Tensor x = at::randn({2, 3, 8, 8});
  RankDevice bf16;
  bf16.bf16 = true;
  {
    AutocastScope scope(bf16);
    EXPECT_EQ(conv->forward(x).scalar_type(), at::kBFloat16);
    // BatchNorm-free float32 work the trainer does after the encoders.
    EXPECT_EQ(conv->forward(x).to(at::kFloat).scalar_type(), at::kFloat);
  }
  EXPECT_EQ(conv->forward(x).scalar_type(), at::kFloat);
  {
    AutocastScope scope{RankDevice()};
    EXPECT_EQ(conv->forward(x).scalar_type(), at::kFloat);
  }
}

}  // namespace
}  // namespace momentum::worker
