#include "worker/process_group.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "worker/device.h"

namespace momentum::worker {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;
using Clock = std::chrono::steady_clock;

// Rendezvous and collectives between threads on loopback take milliseconds;
// a generous timeout keeps a loaded machine from failing the happy paths.
constexpr milliseconds kTimeout = seconds(20);
// The timeout of the tests in which a peer is missing.
constexpr milliseconds kShortTimeout = seconds(2);
// How long after the timeout a failing operation may take to return.
constexpr milliseconds kSlack = seconds(8);
// Ranks that have not finished by then are hung: the test binary aborts.
constexpr milliseconds kWatchdog = seconds(90);

// A TCPStore server on an OS-assigned loopback port, and clients to it.
c10::intrusive_ptr<c10d::TCPStore> StartStoreServer(milliseconds timeout) {
  c10d::TCPStoreOptions options;
  options.port = 0;
  options.isServer = true;
  options.waitWorkers = false;
  options.timeout = timeout;
  return c10::make_intrusive<c10d::TCPStore>("127.0.0.1", options);
}

c10::intrusive_ptr<c10d::TCPStore> ConnectStore(uint16_t port,
                                                milliseconds timeout) {
  c10d::TCPStoreOptions options;
  options.port = port;
  options.isServer = false;
  options.waitWorkers = false;
  options.timeout = timeout;
  return c10::make_intrusive<c10d::TCPStore>("127.0.0.1", options);
}

// Runs body(rank) on one thread per rank and waits for all of them; aborts
// the whole binary when they have not finished within kWatchdog, since a hung
// collective cannot be cancelled.
void RunOnThreads(int64_t world_size,
                  const std::function<void(int64_t rank)>& body) {
  std::mutex mu;
  std::condition_variable cv;
  int64_t done = 0;
  std::vector<std::thread> threads;
  for (int64_t rank = 0; rank < world_size; ++rank) {
    threads.emplace_back([&, rank] {
      body(rank);
      std::lock_guard<std::mutex> lock(mu);
      ++done;
      cv.notify_all();
    });
  }
  {
    std::unique_lock<std::mutex> lock(mu);
    if (!cv.wait_for(lock, kWatchdog, [&] { return done == world_size; })) {
      std::fprintf(stderr, "ranks still running after %lld s: hung\n",
                   static_cast<long long>(kWatchdog.count() / 1000));
      std::abort();
    }
  }
  for (std::thread& thread : threads) thread.join();
}

DistOptions RankOptions(int64_t rank, int64_t world_size,
                        milliseconds timeout) {
  DistOptions options;
  options.rank = rank;
  options.world_size = world_size;
  options.timeout = timeout;
  return options;
}

// The test parameter: a number of ranks, or kOpenSingle for one rank whose
// collectives run through an opened backend (DistOptions::open_single, what
// scripts/gpu-check.sh does with NCCL on one GPU).
constexpr int64_t kOpenSingle = 0;

int64_t WorldOf(int64_t param) { return std::max<int64_t>(param, 1); }

// Builds a group of WorldOf(`param`) ranks on threads, one TCPStore client
// each, then runs body(group) on every rank. The groups are destroyed only
// after every rank has finished, so no rank sees a peer leave early.
void RunRanks(int64_t param,
              const std::function<void(ProcessGroup& group)>& body) {
  const int64_t world_size = WorldOf(param);
  const bool open = param == kOpenSingle;
  c10::intrusive_ptr<c10d::TCPStore> server;
  if (world_size > 1 || open) server = StartStoreServer(kTimeout);
  std::vector<std::unique_ptr<ProcessGroup>> groups(world_size);
  RunOnThreads(world_size, [&](int64_t rank) {
    DistOptions options = RankOptions(rank, world_size, kTimeout);
    options.open_single = open;
    absl::StatusOr<std::unique_ptr<ProcessGroup>> group =
        world_size == 1 && !open
            ? ProcessGroup::Create(options)
            : ProcessGroup::Create(options,
                                   ConnectStore(server->getPort(), kTimeout));
    ASSERT_TRUE(group.ok()) << group.status();
    EXPECT_EQ((*group)->rank(), rank);
    EXPECT_EQ((*group)->world_size(), world_size);
    body(**group);
    groups[rank] = std::move(*group);
  });
}

class ProcessGroupTest : public ::testing::TestWithParam<int64_t> {};

TEST_P(ProcessGroupTest, AllGatherConcatenatesInRankOrder) {
  const int64_t world_size = WorldOf(GetParam());
  constexpr int64_t kRows = 3, kCols = 4;
  RunRanks(GetParam(), [&](ProcessGroup& group) {
    // Row i of rank r holds 10 r + i in every column.
    const at::Tensor local =
        (at::arange(kRows, at::kFloat) + 10.0 * group.rank())
            .unsqueeze(1)
            .expand({kRows, kCols});
    absl::StatusOr<at::Tensor> gathered = group.AllGather(local);
    ASSERT_TRUE(gathered.ok()) << gathered.status();
    ASSERT_EQ(gathered->sizes().vec(),
              (std::vector<int64_t>{world_size * kRows, kCols}));
    ASSERT_EQ(gathered->scalar_type(), at::kFloat);
    auto values = gathered->accessor<float, 2>();
    for (int64_t row = 0; row < world_size * kRows; ++row) {
      const float expected = 10.0f * (row / kRows) + row % kRows;
      for (int64_t col = 0; col < kCols; ++col) {
        EXPECT_EQ(values[row][col], expected)
            << "rank " << group.rank() << " row " << row << " col " << col;
      }
    }
  });
}

TEST_P(ProcessGroupTest, BroadcastGivesTheRootTensorToEveryRank) {
  const int64_t world_size = WorldOf(GetParam());
  const int64_t root = world_size > 1 ? 1 : 0;
  RunRanks(GetParam(), [&](ProcessGroup& group) {
    const auto mine = [&](int64_t rank) {
      return at::arange(6, at::kDouble).reshape({2, 3}) + 100.0 * rank;
    };
    at::Tensor dense = mine(group.rank());
    ASSERT_TRUE(group.Broadcast(dense, root).ok());
    EXPECT_TRUE(at::equal(dense, mine(root))) << "rank " << group.rank();
    // A non-contiguous tensor is written through its view.
    at::Tensor transposed = mine(group.rank()).t();
    ASSERT_TRUE(group.Broadcast(transposed, root).ok());
    EXPECT_TRUE(at::equal(transposed, mine(root).t()))
        << "rank " << group.rank();
  });
}

// What rank `rank` contributes in AllReduceMeanAveragesAcrossBuckets: a list
// of float tensors of different shapes (one a scalar, one a transposed view,
// one double) drawn from a generator seeded by the rank.
std::vector<at::Tensor> RankTensors(int64_t rank) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(1000 + rank);
  const std::vector<std::vector<int64_t>> shapes = {{3},  {2, 5}, {4, 1, 3}, {},
                                                    {17}, {6},    {1}};
  std::vector<at::Tensor> tensors;
  for (const auto& shape : shapes) {
    tensors.push_back(at::randn(shape, gen, at::kFloat));
  }
  tensors.push_back(at::randn({4, 3}, gen, at::kFloat).t());
  tensors.push_back(at::randn({5}, gen, at::kDouble));
  tensors.push_back(at::randn({2, 2}, gen, at::kFloat));
  return tensors;
}

TEST_P(ProcessGroupTest, AllReduceMeanAveragesAcrossBuckets) {
  const int64_t world_size = WorldOf(GetParam());
  // The mean of each tensor over the ranks, computed directly.
  std::vector<at::Tensor> expected = RankTensors(0);
  for (int64_t rank = 1; rank < world_size; ++rank) {
    std::vector<at::Tensor> theirs = RankTensors(rank);
    for (size_t i = 0; i < expected.size(); ++i) expected[i] += theirs[i];
  }
  for (at::Tensor& t : expected) t /= static_cast<double>(world_size);

  RunRanks(GetParam(), [&](ProcessGroup& group) {
    // 32 bytes: most tensors alone and reduced in place, [6] and [1] in one
    // flat bucket, the transposed one through a copy, the double one alone
    // by dtype. The default: one flat bucket of floats.
    for (int64_t bucket_bytes :
         {int64_t{32}, ProcessGroup::kDefaultBucketBytes}) {
      std::vector<at::Tensor> tensors = RankTensors(group.rank());
      std::vector<at::Tensor> originals = tensors;  // the same storages
      ASSERT_TRUE(group.AllReduceMean(tensors, bucket_bytes).ok());
      ASSERT_EQ(tensors.size(), expected.size());
      for (size_t i = 0; i < tensors.size(); ++i) {
        EXPECT_TRUE(tensors[i].is_same(originals[i])) << "tensor " << i;
        EXPECT_EQ(tensors[i].sizes(), expected[i].sizes()) << "tensor " << i;
        EXPECT_EQ(tensors[i].scalar_type(), expected[i].scalar_type());
        EXPECT_TRUE(at::allclose(tensors[i], expected[i], 1e-5, 1e-6))
            << "rank " << group.rank() << " tensor " << i << " bucket_bytes "
            << bucket_bytes;
      }
    }
  });
}

TEST_P(ProcessGroupTest, BarrierReturnsOnEveryRank) {
  RunRanks(GetParam(), [&](ProcessGroup& group) {
    for (int i = 0; i < 3; ++i) EXPECT_TRUE(group.Barrier().ok());
  });
}

TEST_P(ProcessGroupTest, RejectsBadArgumentsBeforeCommunicating) {
  const int64_t world_size = WorldOf(GetParam());
  RunRanks(GetParam(), [&](ProcessGroup& group) {
    EXPECT_EQ(group.AllGather(at::scalar_tensor(1.0)).status().code(),
              absl::StatusCode::kInvalidArgument);
    at::Tensor t = at::zeros({2});
    absl::Status root = group.Broadcast(t, world_size);
    EXPECT_EQ(root.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(root.message().find("root must be in [0, "), std::string::npos)
        << root;
    std::vector<at::Tensor> ints = {at::zeros({2}), at::zeros({2}, at::kLong)};
    absl::Status dtype = group.AllReduceMean(ints);
    EXPECT_EQ(dtype.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(dtype.message().find("tensor 1 is Long"), std::string::npos)
        << dtype;
    std::vector<at::Tensor> floats = {at::zeros({2})};
    EXPECT_EQ(group.AllReduceMean(floats, 0).code(),
              absl::StatusCode::kInvalidArgument);
    // The group still works: nothing was sent.
    EXPECT_TRUE(group.Barrier().ok());
  });
}

INSTANTIATE_TEST_SUITE_P(Worlds, ProcessGroupTest,
                         ::testing::Values(kOpenSingle, 1, 2, 3),
                         [](const ::testing::TestParamInfo<int64_t>& info) {
                           return info.param == kOpenSingle
                                      ? std::string("OpenedSingleRank")
                                      : "World" + std::to_string(info.param);
                         });

// A NCCL group of one rank on the GPU (NCCL refuses two ranks on one GPU)
// runs every collective the trainer uses: on device tensors, float32,
// float64 and int64, in several buckets, and on host tensors, which the
// group stages through the GPU. Runs where a GPU is visible
// (scripts/gpu-check.sh).
TEST(ProcessGroupGpuTest, NcclGroupOfOneRankRunsEveryCollective) {
  if (VisibleCudaDevices() == 0) GTEST_SKIP() << "no GPU visible";
  c10::intrusive_ptr<c10d::TCPStore> server = StartStoreServer(kTimeout);
  DistOptions options = RankOptions(0, 1, kTimeout);
  options.backend = "nccl";
  options.cuda_device = 0;
  options.open_single = true;
  auto group = ProcessGroup::Create(options, server);
  ASSERT_TRUE(group.ok()) << group.status();
  const auto cuda = at::TensorOptions().device(at::kCUDA, 0);

  const at::Tensor keys = at::randn({6, 4}, cuda);
  absl::StatusOr<at::Tensor> gathered = (*group)->AllGather(keys);
  ASSERT_TRUE(gathered.ok()) << gathered.status();
  EXPECT_TRUE(gathered->is_cuda());
  EXPECT_TRUE(at::equal(gathered->cpu(), keys.cpu()));

  at::Tensor perm = at::randperm(10, cuda.dtype(at::kLong));
  const at::Tensor sent = perm.clone();
  ASSERT_TRUE((*group)->Broadcast(perm, 0).ok());
  EXPECT_TRUE(at::equal(perm.cpu(), sent.cpu()));

  // The mean over one rank is the tensor itself; 64-byte buckets make
  // several all-reduces, and the host scalars go through the GPU.
  std::vector<at::Tensor> grads = {at::randn({8}, cuda),
                                   at::randn({3, 5}, cuda),
                                   at::randn({2}, cuda.dtype(at::kDouble)),
                                   at::tensor({1.5, -2.0}, at::kDouble)};
  std::vector<at::Tensor> before;
  for (const at::Tensor& g : grads) before.push_back(g.cpu().clone());
  ASSERT_TRUE((*group)->AllReduceMean(grads, /*bucket_bytes=*/64).ok());
  for (size_t i = 0; i < grads.size(); ++i) {
    EXPECT_TRUE(at::allclose(grads[i].cpu(), before[i])) << "tensor " << i;
  }
  EXPECT_TRUE(grads[3].is_cpu());
  EXPECT_TRUE((*group)->Barrier().ok());
}

// ---- faults: every failure returns within about the timeout ----

// A loopback port that refuses connections: bound, never listening, held
// until destroyed so that no one else can take it.
class RefusingPort {
 public:
  RefusingPort() {
    fd_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = 0;
    EXPECT_EQ(bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    socklen_t len = sizeof(addr);
    EXPECT_EQ(getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len), 0);
    port_ = ntohs(addr.sin_port);
  }
  ~RefusingPort() { close(fd_); }
  uint16_t port() const { return port_; }

 private:
  int fd_ = -1;
  uint16_t port_ = 0;
};

TEST(ProcessGroupTest, RendezvousTimesOutWhenAPeerNeverJoins) {
  // Rank 0 serves the store on a port of the OS's choosing; rank 1 never
  // comes.
  DistOptions options = RankOptions(0, 2, kShortTimeout);
  options.master_port = 0;
  const Clock::time_point start = Clock::now();
  absl::StatusOr<std::unique_ptr<ProcessGroup>> group =
      ProcessGroup::Create(options);
  const auto elapsed = Clock::now() - start;
  ASSERT_FALSE(group.ok());
  EXPECT_EQ(group.status().code(), absl::StatusCode::kDeadlineExceeded)
      << group.status();
  EXPECT_TRUE(
      absl::StartsWith(group.status().message(), "rendezvous with 127.0.0.1:"))
      << group.status();
  EXPECT_NE(group.status().message().find("(rank 0 of 2)"), std::string::npos)
      << group.status();
  EXPECT_LT(elapsed, kShortTimeout + kSlack);
}

TEST(ProcessGroupTest, RendezvousTimesOutWhenTheStoreNeverAnswers) {
  RefusingPort refusing;
  DistOptions options = RankOptions(1, 2, kShortTimeout);
  options.master_port = refusing.port();
  const Clock::time_point start = Clock::now();
  absl::StatusOr<std::unique_ptr<ProcessGroup>> group =
      ProcessGroup::Create(options);
  const auto elapsed = Clock::now() - start;
  ASSERT_FALSE(group.ok());
  EXPECT_EQ(group.status().code(), absl::StatusCode::kDeadlineExceeded)
      << group.status();
  EXPECT_TRUE(absl::StartsWith(
      group.status().message(),
      "rendezvous with 127.0.0.1:" + std::to_string(refusing.port()) +
          " (rank 1 of 2)"))
      << group.status();
  EXPECT_LT(elapsed, kShortTimeout + kSlack);
}

// Two ranks join and pass a barrier; rank 1 then does `peer` while rank 0
// runs a collective, which must fail within about the timeout with one of
// `codes` and leave the group broken.
void ExpectCollectiveFailsWhilePeer(
    const std::function<void(std::unique_ptr<ProcessGroup>&)>& peer,
    const std::vector<absl::StatusCode>& codes) {
  c10::intrusive_ptr<c10d::TCPStore> server = StartStoreServer(kTimeout);
  std::vector<std::unique_ptr<ProcessGroup>> groups(2);
  std::mutex mu;
  std::condition_variable cv;
  bool rank0_done = false;
  const auto rank0 = [&] {
    const Clock::time_point start = Clock::now();
    std::vector<at::Tensor> tensors = {at::ones({1000})};
    absl::Status status = groups[0]->AllReduceMean(tensors);
    const auto elapsed = Clock::now() - start;
    ASSERT_FALSE(status.ok());
    EXPECT_NE(std::find(codes.begin(), codes.end(), status.code()), codes.end())
        << status;
    EXPECT_TRUE(
        absl::StartsWith(status.message(), "AllReduceMean (rank 0 of 2): "))
        << status;
    EXPECT_LT(elapsed, kShortTimeout + kSlack);
    // Broken for good, saying why, without waiting again.
    const Clock::time_point again = Clock::now();
    absl::Status barrier = groups[0]->Barrier();
    EXPECT_EQ(barrier.code(), absl::StatusCode::kFailedPrecondition) << barrier;
    EXPECT_NE(barrier.message().find(status.message()), std::string::npos)
        << barrier;
    EXPECT_LT(Clock::now() - again, seconds(1));
  };
  RunOnThreads(2, [&](int64_t rank) {
    auto group =
        ProcessGroup::Create(RankOptions(rank, 2, kShortTimeout),
                             ConnectStore(server->getPort(), kShortTimeout));
    EXPECT_TRUE(group.ok()) << group.status();
    if (group.ok()) {
      groups[rank] = std::move(*group);
      // Both ranks are fully connected before one goes quiet or away.
      EXPECT_TRUE(groups[rank]->Barrier().ok());
    }
    if (rank == 1) {
      if (groups[1]) peer(groups[1]);
      // Stay (or stay gone) until rank 0 has seen the failure.
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return rank0_done; });
      return;
    }
    if (groups[0]) rank0();
    std::lock_guard<std::mutex> lock(mu);
    rank0_done = true;
    cv.notify_all();
  });
}

TEST(ProcessGroupTest, CollectiveTimesOutWhenAPeerStopsCalling) {
  ExpectCollectiveFailsWhilePeer([](std::unique_ptr<ProcessGroup>&) {},
                                 {absl::StatusCode::kDeadlineExceeded});
}

TEST(ProcessGroupTest, CollectiveFailsWhenAPeerLeaves) {
  ExpectCollectiveFailsWhilePeer(
      [](std::unique_ptr<ProcessGroup>& group) { group.reset(); },
      {absl::StatusCode::kUnavailable, absl::StatusCode::kDeadlineExceeded});
}

TEST(ProcessGroupTest, CreateRejectsBadOptions) {
  struct Case {
    DistOptions options;
    std::string message;
  };
  std::vector<Case> cases;
  cases.push_back({RankOptions(2, 2, kTimeout), "rank must be in [0, "});
  cases.push_back({RankOptions(0, 0, kTimeout), "world_size must be >= 1"});
  cases.push_back({RankOptions(0, 1, milliseconds(0)), "timeout must be > 0"});
  cases.push_back({RankOptions(1, 2, kTimeout), "master_port must be in [1, "});
  cases.push_back({RankOptions(0, 2, kTimeout), "backend must be"});
  cases.back().options.backend = "mpi";
#ifndef MOMENTUM_WITH_CUDA
  cases.push_back({RankOptions(0, 2, kTimeout), "MOMENTUM_WITH_CUDA"});
  cases.back().options.backend = "nccl";
#endif
  for (const Case& c : cases) {
    absl::StatusOr<std::unique_ptr<ProcessGroup>> group =
        ProcessGroup::Create(c.options);
    ASSERT_FALSE(group.ok()) << c.message;
    EXPECT_EQ(group.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(group.status().message().find(c.message), std::string::npos)
        << group.status();
  }
}

// ---- DistOptionsFromEnv ----

// Sets (or, with nullopt, unsets) torchrun's variables for one test and puts
// back what was there.
class ScopedEnv {
 public:
  explicit ScopedEnv(
      const std::map<std::string, std::optional<std::string>>& values) {
    for (const char* name :
         {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}) {
      const char* old = std::getenv(name);
      saved_[name] = old ? std::optional<std::string>(old) : std::nullopt;
      unsetenv(name);
    }
    for (const auto& [name, value] : values) {
      if (value) setenv(name.c_str(), value->c_str(), 1);
    }
  }
  ~ScopedEnv() {
    for (const auto& [name, value] : saved_) {
      if (value) {
        setenv(name.c_str(), value->c_str(), 1);
      } else {
        unsetenv(name.c_str());
      }
    }
  }

 private:
  std::map<std::string, std::optional<std::string>> saved_;
};

using Env = std::map<std::string, std::optional<std::string>>;

Env GoodEnv() {
  return {{"RANK", "3"},
          {"WORLD_SIZE", "4"},
          {"LOCAL_RANK", "1"},
          {"MASTER_ADDR", "10.0.0.5"},
          {"MASTER_PORT", "29500"}};
}

TEST(ProcessGroupTest, DistOptionsFromEnvReadsTorchrunVariables) {
  ScopedEnv env(GoodEnv());
  absl::StatusOr<DistOptions> options = DistOptionsFromEnv();
  ASSERT_TRUE(options.ok()) << options.status();
  EXPECT_EQ(options->rank, 3);
  EXPECT_EQ(options->world_size, 4);
  EXPECT_EQ(options->local_rank, 1);
  EXPECT_EQ(options->master_addr, "10.0.0.5");
  EXPECT_EQ(options->master_port, 29500);
  EXPECT_EQ(options->backend, "gloo");
  EXPECT_EQ(options->timeout, DistOptions().timeout);
}

TEST(ProcessGroupTest, DistOptionsFromEnvNeedsNoAddressForOneRank) {
  ScopedEnv env({{"RANK", "0"}, {"WORLD_SIZE", "1"}});
  absl::StatusOr<DistOptions> options = DistOptionsFromEnv();
  ASSERT_TRUE(options.ok()) << options.status();
  EXPECT_EQ(options->rank, 0);
  EXPECT_EQ(options->world_size, 1);
  EXPECT_EQ(options->local_rank, 0);
}

TEST(ProcessGroupTest, DistOptionsFromEnvRejectsMalformedValues) {
  const std::vector<std::pair<Env, std::string>> cases = {
      {{{"RANK", "x"}},
       "RANK must be an integer in [0, WORLD_SIZE), got \"x\""},
      {{{"RANK", "4"}},
       "RANK must be an integer in [0, WORLD_SIZE), got \"4\""},
      {{{"RANK", "-1"}},
       "RANK must be an integer in [0, WORLD_SIZE), got \"-1\""},
      {{{"WORLD_SIZE", "0"}}, "WORLD_SIZE must be an integer >= 1, got \"0\""},
      {{{"WORLD_SIZE", "two"}},
       "WORLD_SIZE must be an integer >= 1, got \"two\""},
      {{{"LOCAL_RANK", "1.5"}},
       "LOCAL_RANK must be an integer in [0, WORLD_SIZE), got \"1.5\""},
      {{{"MASTER_ADDR", ""}},
       "MASTER_ADDR must be a host name or address, got \"\""},
      {{{"MASTER_PORT", "70000"}},
       "MASTER_PORT must be an integer in [1, 65535], got \"70000\""},
      {{{"MASTER_PORT", "0"}},
       "MASTER_PORT must be an integer in [1, 65535], got \"0\""},
      {{{"MASTER_PORT", "http"}},
       "MASTER_PORT must be an integer in [1, 65535], got \"http\""},
  };
  for (const auto& [change, message] : cases) {
    Env values = GoodEnv();
    for (const auto& [name, value] : change) values[name] = value;
    ScopedEnv env(values);
    absl::StatusOr<DistOptions> options = DistOptionsFromEnv();
    ASSERT_FALSE(options.ok()) << message;
    EXPECT_EQ(options.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(options.status().message(), message);
  }
}

TEST(ProcessGroupTest, DistOptionsFromEnvNamesAMissingVariable) {
  for (const char* name :
       {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}) {
    Env values = GoodEnv();
    values[name] = std::nullopt;
    ScopedEnv env(values);
    absl::StatusOr<DistOptions> options = DistOptionsFromEnv();
    ASSERT_FALSE(options.ok()) << name;
    EXPECT_EQ(options.status().code(), absl::StatusCode::kNotFound);
    EXPECT_TRUE(absl::StartsWith(
        options.status().message(),
        absl::StrCat("environment variable ", name, " is not set")))
        << options.status();
  }
  // LOCAL_RANK is optional.
  Env values = GoodEnv();
  values["LOCAL_RANK"] = std::nullopt;
  ScopedEnv env(values);
  absl::StatusOr<DistOptions> options = DistOptionsFromEnv();
  ASSERT_TRUE(options.ok()) << options.status();
  EXPECT_EQ(options->local_rank, 0);
}

}  // namespace
}  // namespace momentum::worker
