// GPUs as a resource: the --gpus flag, detection from device files and the
// driver's folder (fake ones here), CUDA_VISIBLE_DEVICES, and what
// resources.device auto becomes at submission.
#include "server/gpus.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace momentum::server {
namespace {

namespace fs = std::filesystem;
using Gpus = std::vector<int>;

// A /dev and a /proc/driver/nvidia/gpus of our own.
class FakeMachine {
 public:
  FakeMachine() {
    char pattern[] = "/tmp/momentum-gpus-test-XXXXXX";
    root_ = ::mkdtemp(pattern);
    probe_.dev_dir = root_ + "/dev";
    probe_.proc_dir = root_ + "/proc-gpus";
    fs::create_directories(probe_.dev_dir);
    fs::create_directories(probe_.proc_dir);
    // Device files of the driver that are not GPUs.
    for (const char* name : {"nvidiactl", "nvidia-uvm", "nvidia-modeset"}) {
      Touch(probe_.dev_dir + "/" + name);
    }
  }
  ~FakeMachine() { fs::remove_all(root_); }

  void AddDeviceFiles(int n) {
    for (int i = 0; i < n; ++i) {
      Touch(probe_.dev_dir + "/nvidia" + std::to_string(i));
    }
  }
  void AddDriverEntries(int n) {
    for (int i = 0; i < n; ++i) {
      fs::create_directories(probe_.proc_dir + "/0000:0" + std::to_string(i) +
                             ":00.0");
    }
  }
  GpuProbe Probe(std::optional<std::string> visible = std::nullopt) const {
    GpuProbe probe = probe_;
    probe.visible_devices = std::move(visible);
    return probe;
  }

 private:
  static void Touch(const std::string& path) { std::ofstream{path}; }
  std::string root_;
  GpuProbe probe_;
};

std::string FlagError(const std::string& value) {
  FakeMachine machine;
  absl::StatusOr<Gpus> gpus = ParseGpusFlag(value, "--gpus", machine.Probe());
  EXPECT_FALSE(gpus.ok()) << value;
  EXPECT_EQ(gpus.status().code(), absl::StatusCode::kInvalidArgument);
  return std::string(gpus.status().message());
}

TEST(GpusTest, FlagTakesNoneAndListsOfIndices) {
  FakeMachine machine;
  EXPECT_EQ(*ParseGpusFlag("none", "--gpus", machine.Probe()), Gpus{});
  EXPECT_EQ(*ParseGpusFlag("0,1,3", "--gpus", machine.Probe()),
            (Gpus{0, 1, 3}));
  EXPECT_EQ(*ParseGpusFlag("2", "--gpus", machine.Probe()), Gpus{2});
  // Declared GPUs need not exist: the flag is the operator's word.
  EXPECT_EQ(*ParseGpusFlag("5, 4", "--gpus", machine.Probe()), (Gpus{5, 4}));
}

TEST(GpusTest, BadFlagValuesNameTheFlagAndTheRule) {
  const std::string rule =
      "--gpus must be auto, none or a comma list of distinct GPU indices >= 0 "
      "(e.g. 0,1,3), got ";
  EXPECT_EQ(FlagError("1,1"), rule + "\"1,1\": GPU 1 is listed twice");
  EXPECT_EQ(FlagError("-1"), rule + "\"-1\": GPU index -1 is negative");
  EXPECT_EQ(FlagError("gpu0"), rule + "\"gpu0\": \"gpu0\" is not a GPU index");
  EXPECT_EQ(FlagError(""), rule + "\"\": \"\" is not a GPU index");
  EXPECT_EQ(FlagError("0,,1"), rule + "\"0,,1\": \"\" is not a GPU index");
  EXPECT_EQ(FlagError("1.5"), rule + "\"1.5\": \"1.5\" is not a GPU index");
  EXPECT_EQ(FlagError("all"), rule + "\"all\": \"all\" is not a GPU index");
}

TEST(GpusTest, AutoCountsGpuDeviceFiles) {
  FakeMachine machine;
  machine.AddDeviceFiles(2);
  EXPECT_EQ(*ParseGpusFlag("auto", "--gpus", machine.Probe()), (Gpus{0, 1}));
}

TEST(GpusTest, AutoFallsBackOnTheDriversEntries) {
  FakeMachine machine;
  machine.AddDriverEntries(3);
  EXPECT_EQ(*DetectGpus(machine.Probe()), (Gpus{0, 1, 2}));
}

TEST(GpusTest, AutoFindsNoneOnAMachineWithoutGpus) {
  FakeMachine machine;
  EXPECT_EQ(*DetectGpus(machine.Probe()), Gpus{});
  GpuProbe missing;
  missing.dev_dir = "/nonexistent/dev";
  missing.proc_dir = "/nonexistent/proc";
  EXPECT_EQ(*DetectGpus(missing), Gpus{});
}

TEST(GpusTest, AutoHonoursCudaVisibleDevicesLikeCuda) {
  FakeMachine machine;
  machine.AddDeviceFiles(4);
  EXPECT_EQ(*DetectGpus(machine.Probe("2")), Gpus{2});
  EXPECT_EQ(*DetectGpus(machine.Probe("3,1")), (Gpus{3, 1}));
  EXPECT_EQ(*DetectGpus(machine.Probe(" 0, 2 ")), (Gpus{0, 2}));
  // Set and empty hides every GPU; CUDA stops at an index that names none.
  EXPECT_EQ(*DetectGpus(machine.Probe("")), Gpus{});
  EXPECT_EQ(*DetectGpus(machine.Probe("-1")), Gpus{});
  EXPECT_EQ(*DetectGpus(machine.Probe("1,-1,2")), Gpus{1});
  EXPECT_EQ(*DetectGpus(machine.Probe("0,7,1")), Gpus{0});
}

TEST(GpusTest, AutoRefusesCudaVisibleDevicesItCannotMapToIndices) {
  FakeMachine machine;
  machine.AddDeviceFiles(2);
  absl::StatusOr<Gpus> uuid =
      ParseGpusFlag("auto", "--gpus",
                    machine.Probe("GPU-8f6a4c1e-0b7e-4d3e-9a1b-1c2d3e4f5a6b"));
  ASSERT_FALSE(uuid.ok());
  EXPECT_EQ(uuid.status().message(),
            "--gpus auto: CUDA_VISIBLE_DEVICES=\"GPU-8f6a4c1e-0b7e-4d3e-9a1b-"
            "1c2d3e4f5a6b\" (name the GPUs to offer by index with --gpus): "
            "\"GPU-8f6a4c1e-0b7e-4d3e-9a1b-1c2d3e4f5a6b\" is not a GPU index");
  absl::StatusOr<Gpus> twice =
      ParseGpusFlag("auto", "--agent-gpus", machine.Probe("1,1"));
  ASSERT_FALSE(twice.ok());
  EXPECT_EQ(twice.status().message(),
            "--agent-gpus auto: CUDA_VISIBLE_DEVICES=\"1,1\": GPU 1 is listed "
            "twice");
}

TEST(GpusTest, CheckGpuIndicesNamesWhatItChecks) {
  EXPECT_TRUE(CheckGpuIndices({}, "AgentHello.gpus").ok());
  EXPECT_TRUE(CheckGpuIndices({3, 0, 1}, "AgentHello.gpus").ok());
  EXPECT_EQ(CheckGpuIndices({0, 0}, "AgentHello.gpus").message(),
            "AgentHello.gpus: GPU 0 is listed twice");
  EXPECT_EQ(CheckGpuIndices({-2}, "AgentHello.gpus").message(),
            "AgentHello.gpus: GPU index -2 is negative");
}

TEST(GpusTest, GpuListIsForPeople) {
  EXPECT_EQ(GpuList({}), "none");
  EXPECT_EQ(GpuList({0}), "0");
  EXPECT_EQ(GpuList({0, 1, 3}), "0,1,3");
}

JobSpec SpecWith(const std::string& device, int64_t nproc,
                 const std::string& backend = "auto") {
  JobSpec spec;
  spec.resources.device = device;
  spec.resources.nproc = nproc;
  spec.resources.backend = backend;
  return spec;
}

TEST(GpusTest, AutoIsCudaWhereTheClusterHasGpusElseCpu) {
  JobSpec spec = SpecWith("auto", 2);
  ASSERT_TRUE(ResolveDevice(2, &spec).ok());
  EXPECT_EQ(spec.resources.device, "cuda");
  spec = SpecWith("auto", 3);
  ASSERT_TRUE(ResolveDevice(0, &spec).ok());
  EXPECT_EQ(spec.resources.device, "cpu");
  // An explicit device stays as it is.
  spec = SpecWith("cpu", 3);
  ASSERT_TRUE(ResolveDevice(8, &spec).ok());
  EXPECT_EQ(spec.resources.device, "cpu");
  spec = SpecWith("cuda", 2, "nccl");
  ASSERT_TRUE(ResolveDevice(2, &spec).ok());
  EXPECT_EQ(spec.resources.device, "cuda");
}

TEST(GpusTest, CudaJobWithMoreRanksThanGpusIsRefusedNamingNproc) {
  JobSpec spec = SpecWith("cuda", 3);
  absl::Status s = ResolveDevice(2, &spec);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(),
            "resources.nproc 3 asks for 3 GPUs (resources.device cuda), but "
            "the cluster has 2");
  spec = SpecWith("cuda", 1);
  EXPECT_EQ(ResolveDevice(0, &spec).message(),
            "resources.nproc 1 asks for 1 GPU (resources.device cuda), but "
            "the cluster has none");
  spec = SpecWith("auto", 4);
  EXPECT_EQ(ResolveDevice(2, &spec).message(),
            "resources.nproc 4 asks for 4 GPUs (resources.device auto, which "
            "is cuda on a cluster with GPUs), but the cluster has 2; set "
            "resources.device cpu to run on CPU slots");
}

TEST(GpusTest, NcclWithAutoNeedsGpus) {
  JobSpec spec = SpecWith("auto", 1, "nccl");
  absl::Status s = ResolveDevice(0, &spec);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(),
            "resources.backend nccl requires resources.device cuda, but "
            "resources.device auto is cpu here: the cluster has no GPUs");
}

}  // namespace
}  // namespace momentum::server
