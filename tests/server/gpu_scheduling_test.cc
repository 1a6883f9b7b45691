// GPUs as a schedulable resource, end to end: the real momentum-server (and
// momentum-agent) binaries on 127.0.0.1 with ports the OS assigns and
// declared GPUs (--gpus 0,1: no GPU is needed), running a fake worker, a
// shell script that records the CUDA_VISIBLE_DEVICES and RANK it was started
// with and the device of the spec it was given, then waits until the test
// releases its job.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "momentum/v1/jobs.grpc.pb.h"
#include "tests/http_get.h"
#include "tests/proc_util.h"
#include "tests/server/test_job_client.h"

namespace momentum::server {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using ::momentum::server::testing::TestJobClient;
using ::momentum::testing::Eventually;
using ::momentum::testing::Process;
using std::chrono::seconds;

using ::momentum::testing::BinaryDir;
using ::momentum::testing::ReadFile;

// The fake momentum-worker: `momentum-worker --config SPEC`. It appends one
// line to <dir>/ranks.log, then exits 0 once <dir>/release-<job id> exists
// (a stopped rank dies of SIGTERM). `cuda=unset` tells an unset
// CUDA_VISIBLE_DEVICES from an empty one.
void WriteFakeWorker(const std::string& dir) {
  const std::string path = dir + "/fake-worker.sh";
  std::ofstream(path) << "#!/bin/sh\n"
                      << "spec=$2\n"
                      << "device=$(sed -n 's/^  device: *//p' \"$spec\")\n"
                      << "echo \"job=$MOMENTUM_JOB_ID attempt=$MOMENTUM_ATTEMPT"
                         " rank=$RANK cuda=${CUDA_VISIBLE_DEVICES-unset}"
                         " device=$device\" >> "
                      << dir << "/ranks.log\n"
                      << "while [ ! -e " << dir
                      << "/release-$MOMENTUM_JOB_ID ]; do sleep 0.05; done\n";
  ::chmod(path.c_str(), 0755);
}

// One line of ranks.log: what a rank was started with.
struct RankRecord {
  std::string job, attempt, rank, cuda, device;
};

class GpuSchedulingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char pattern[] = "/tmp/momentum-gpu-sched-XXXXXX";
    dir_ = ::mkdtemp(pattern);
    WriteFakeWorker(dir_);
  }
  void TearDown() override {
    client_.reset();
    agents_.clear();
    server_.reset();
    fs::remove_all(dir_);
  }

  // The server with `--slots` and `--gpus` (flags such as "--gpus=0,1"),
  // its state in <dir>/state, ranks run by the fake worker.
  void StartServer(const std::vector<std::string>& flags) {
    const std::string ready = dir_ + "/ready.json";
    fs::remove(ready);
    std::vector<std::string> args = {BinaryDir() + "/server/momentum-server",
                                     "--listen=127.0.0.1:0",
                                     "--metrics-listen=127.0.0.1:0",
                                     "--state-dir=" + dir_ + "/state",
                                     "--worker=" + dir_ + "/fake-worker.sh",
                                     "--grace-seconds=2",
                                     "--ready-file=" + ready};
    args.insert(args.end(), flags.begin(), flags.end());
    server_ = std::make_unique<Process>(args, dir_ + "/server.log");
    ASSERT_TRUE(Eventually([&] { return fs::exists(ready); }))
        << server_->log();
    const auto addresses = nlohmann::json::parse(ReadFile(ready));
    const std::string metrics = addresses["metrics"].get<std::string>();
    metrics_port_ = std::stoi(metrics.substr(metrics.rfind(':') + 1));
    address_ = addresses["grpc"].get<std::string>();
    client_ = std::make_unique<TestJobClient>(address_);
  }

  // A momentum-agent named `name` joined to the server with `flags`.
  void StartAgent(const std::string& name,
                  const std::vector<std::string>& flags) {
    std::vector<std::string> args = {BinaryDir() + "/server/momentum-agent",
                                     "--server=" + address_,
                                     "--name=" + name,
                                     "--advertise=127.0.0.1",
                                     "--work-dir=" + dir_ + "/" + name,
                                     "--worker=" + dir_ + "/fake-worker.sh",
                                     "--grace-seconds=2"};
    args.insert(args.end(), flags.begin(), flags.end());
    agents_.push_back(
        std::make_unique<Process>(args, dir_ + "/" + name + ".log"));
  }

  // A valid spec the fake worker runs: `resources` in YAML flow style. Each
  // has an output_dir of its own: live jobs may not share one.
  static std::string Spec(const std::string& name, const std::string& resources,
                          const std::string& extra = "") {
    static int specs = 0;
    return "name: " + name + "\noutput_dir: out-" + std::to_string(++specs) +
           "\ndata: {path: /nonexistent}\n"
           "optim: {batch_size: 12, epochs: 1}\n"
           "resources: {" +
           resources + "}\n" + extra;
  }

  grpc::Status TrySubmit(const std::string& spec, v1::Job* job) {
    return client_->TrySubmit(spec, job);
  }
  v1::Job Submit(const std::string& spec) { return client_->Submit(spec); }
  v1::Job Get(const std::string& id) { return client_->Get(id); }
  int32_t StoredJobs() { return client_->StoredJobs(); }
  bool WaitForState(const std::string& id, v1::JobState state) {
    return client_->WaitForState(id, state);
  }

  // Lets the job's ranks exit 0 and waits for it to succeed.
  void Release(const std::string& id) {
    std::ofstream(dir_ + "/release-" + id);
    EXPECT_TRUE(WaitForState(id, v1::JOB_STATE_SUCCEEDED))
        << Get(id).state_reason() << "\n"
        << server_->log();
  }

  // What the ranks of the job's `attempt` were started with, by rank,
  // once `ranks` of them have started (empty if they never do).
  std::map<std::string, RankRecord> RanksOf(const std::string& id, size_t ranks,
                                            const std::string& attempt = "1") {
    std::map<std::string, RankRecord> found;
    Eventually([&] {
      found.clear();
      std::istringstream lines(ReadFile(dir_ + "/ranks.log"));
      std::string line;
      while (std::getline(lines, line)) {
        std::map<std::string, std::string> kv;
        std::istringstream words(line);
        std::string word;
        while (words >> word) {
          const size_t eq = word.find('=');
          kv[word.substr(0, eq)] = word.substr(eq + 1);
        }
        if (kv["job"] != id || kv["attempt"] != attempt) continue;
        found[kv["rank"]] = {kv["job"], kv["attempt"], kv["rank"], kv["cuda"],
                             kv["device"]};
      }
      return found.size() == ranks;
    });
    if (found.size() != ranks) found.clear();
    return found;
  }

  // The value of one series on /metrics, e.g. `momentum_worker_gpus{state=
  // "used"}`; "" when absent.
  std::string Metric(const std::string& series) {
    const std::string text =
        ::momentum::testing::HttpGet(metrics_port_, "/metrics").value_or("");
    const size_t at = text.find("\n" + series + " ");
    if (at == std::string::npos) return "";
    const size_t begin = at + series.size() + 2;
    return text.substr(begin, text.find('\n', begin) - begin);
  }
  // Waits for the GPU gauges to read `used` and `free`.
  bool GpusAre(int used, int free) {
    return Eventually([&] {
      return Metric("momentum_worker_gpus{state=\"used\"}") ==
                 std::to_string(used) &&
             Metric("momentum_worker_gpus{state=\"free\"}") ==
                 std::to_string(free);
    });
  }

  std::string dir_;
  std::unique_ptr<Process> server_;
  std::vector<std::unique_ptr<Process>> agents_;
  std::string address_;
  int metrics_port_ = 0;
  std::unique_ptr<TestJobClient> client_;
};

std::set<std::string> GpusOf(const std::map<std::string, RankRecord>& ranks) {
  std::set<std::string> gpus;
  for (const auto& [rank, record] : ranks) gpus.insert(record.cuda);
  return gpus;
}

// Two 1-rank CUDA jobs run at once, each on a GPU of its own, and take no
// slot: a CPU job still runs beside them on the one slot. A third CUDA job
// waits, whole, until a GPU is free, and gets the one freed.
TEST_F(GpuSchedulingTest, CudaJobsOwnAGpuEachAndTheNextWaitsForAFreedOne) {
  ASSERT_NO_FATAL_FAILURE(StartServer({"--slots=1", "--gpus=0,1"}));
  EXPECT_TRUE(GpusAre(0, 2));
  const v1::Job a = Submit(Spec("a", "device: cuda"));
  const v1::Job b = Submit(Spec("b", "device: cuda"));
  const auto rank_a = RanksOf(a.id(), 1), rank_b = RanksOf(b.id(), 1);
  ASSERT_EQ(rank_a.size(), 1u) << server_->log();
  ASSERT_EQ(rank_b.size(), 1u) << server_->log();
  const std::string gpu_a = rank_a.at("0").cuda;
  EXPECT_EQ(std::set<std::string>({gpu_a, rank_b.at("0").cuda}),
            std::set<std::string>({"0", "1"}));
  EXPECT_EQ(rank_a.at("0").device, "cuda");
  EXPECT_EQ(Get(a.id()).state_reason(),
            "1 rank launched (1 on local with GPU " + gpu_a + ")");
  EXPECT_TRUE(GpusAre(2, 0));
  EXPECT_EQ(Metric("momentum_worker_slots{state=\"used\"}"), "0");

  // c waits for a GPU. d, a CPU job of higher priority submitted after it,
  // goes first, on the slot: the scheduler has looked at c and left it.
  const v1::Job c = Submit(Spec("c", "device: cuda"));
  const v1::Job d =
      Submit(Spec("d", "device: cpu", "scheduling: {priority: 5}\n"));
  const auto rank_d = RanksOf(d.id(), 1);
  ASSERT_EQ(rank_d.size(), 1u) << server_->log();
  EXPECT_EQ(rank_d.at("0").cuda, "");  // set, and empty: no GPU
  EXPECT_EQ(rank_d.at("0").device, "cpu");
  EXPECT_EQ(Get(c.id()).state(), v1::JOB_STATE_PENDING);
  EXPECT_EQ(Get(c.id()).queue_position(), 1);
  EXPECT_TRUE(Eventually(
      [&] { return Metric("momentum_worker_slots{state=\"used\"}") == "1"; }));
  EXPECT_TRUE(GpusAre(2, 0));

  Release(a.id());
  const auto rank_c = RanksOf(c.id(), 1);
  ASSERT_EQ(rank_c.size(), 1u) << server_->log();
  EXPECT_EQ(rank_c.at("0").cuda, gpu_a);
  EXPECT_TRUE(GpusAre(2, 0));
  for (const v1::Job& job : {b, c, d}) Release(job.id());
  EXPECT_TRUE(GpusAre(0, 2));
}

// A 2-rank CUDA job takes both GPUs; a 3-rank one is refused at submission,
// naming resources.nproc, and nothing is stored; auto is stored as cuda.
TEST_F(GpuSchedulingTest, GangsTakeOneGpuPerRankAndNeverMoreThanExist) {
  ASSERT_NO_FATAL_FAILURE(StartServer({"--slots=1", "--gpus=0,1"}));
  const v1::Job pair = Submit(Spec("pair", "device: cuda, nproc: 2"));
  const auto ranks = RanksOf(pair.id(), 2);
  ASSERT_EQ(ranks.size(), 2u) << server_->log();
  EXPECT_EQ(GpusOf(ranks), std::set<std::string>({"0", "1"}));
  EXPECT_TRUE(GpusAre(2, 0));
  Release(pair.id());

  v1::Job refused;
  const grpc::Status status =
      TrySubmit(Spec("trio", "device: cuda, nproc: 3"), &refused);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(status.error_message(),
            "resources.nproc 3 asks for 3 GPUs (resources.device cuda), but "
            "the cluster has 2");
  EXPECT_EQ(StoredJobs(), 1);

  const v1::Job automatic = Submit(Spec("auto", "nproc: 2"));
  EXPECT_NE(automatic.spec_yaml().find("\n  device: cuda\n"), std::string::npos)
      << automatic.spec_yaml();
  EXPECT_NE(Get(automatic.id()).spec_yaml().find("\n  device: cuda\n"),
            std::string::npos);
  const auto auto_ranks = RanksOf(automatic.id(), 2);
  ASSERT_EQ(auto_ranks.size(), 2u) << server_->log();
  EXPECT_EQ(GpusOf(auto_ranks), std::set<std::string>({"0", "1"}));
  EXPECT_EQ(auto_ranks.at("1").device, "cuda");
  Release(automatic.id());
}

// Without GPUs, auto is cpu, a CPU rank sees no GPU, and a CUDA job is
// refused.
TEST_F(GpuSchedulingTest, WithoutGpusAutoIsCpuAndCudaIsRefused) {
  ASSERT_NO_FATAL_FAILURE(StartServer({"--slots=2", "--gpus=none"}));
  const v1::Job job = Submit(Spec("cpu", "nproc: 2"));
  EXPECT_NE(job.spec_yaml().find("\n  device: cpu\n"), std::string::npos)
      << job.spec_yaml();
  const auto ranks = RanksOf(job.id(), 2);
  ASSERT_EQ(ranks.size(), 2u) << server_->log();
  for (const auto& [rank, record] : ranks) {
    EXPECT_EQ(record.cuda, "") << "rank " << rank;
    EXPECT_EQ(record.device, "cpu");
  }
  EXPECT_TRUE(GpusAre(0, 0));
  Release(job.id());

  v1::Job refused;
  const grpc::Status status = TrySubmit(Spec("gpu", "device: cuda"), &refused);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(status.error_message(),
            "resources.nproc 1 asks for 1 GPU (resources.device cuda), but "
            "the cluster has none");
  const grpc::Status nccl = TrySubmit(Spec("nccl", "backend: nccl"), &refused);
  EXPECT_EQ(nccl.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(nccl.error_message().find("resources.backend nccl"),
            std::string::npos)
      << nccl.error_message();
  EXPECT_EQ(StoredJobs(), 1);
}

// A coordinator without slots or GPUs of its own and an agent that offers
// GPU 0: a CUDA job is placed there and its rank runs on GPU 0.
TEST_F(GpuSchedulingTest, AgentGpusArePlacedAndGivenToTheRank) {
  ASSERT_NO_FATAL_FAILURE(StartServer({"--slots=0", "--gpus=none"}));
  StartAgent("gpu-node", {"--slots=1", "--gpus=0"});
  ASSERT_TRUE(GpusAre(0, 1)) << agents_.back()->log();
  const v1::Job job = Submit(Spec("remote", "device: auto"));
  EXPECT_NE(job.spec_yaml().find("\n  device: cuda\n"), std::string::npos);
  const auto ranks = RanksOf(job.id(), 1);
  ASSERT_EQ(ranks.size(), 1u) << server_->log() << agents_.back()->log();
  EXPECT_EQ(ranks.at("0").cuda, "0");
  EXPECT_EQ(ranks.at("0").device, "cuda");
  // "1 on agent gpu-node (<hostname>) with GPU 0"
  const std::string reason = Get(job.id()).state_reason();
  EXPECT_EQ(reason.rfind("1 rank launched (1 on agent gpu-node (", 0), 0u)
      << reason;
  EXPECT_TRUE(absl::EndsWith(reason, ") with GPU 0)")) << reason;
  EXPECT_TRUE(GpusAre(1, 0));
  Release(job.id());
  EXPECT_TRUE(GpusAre(0, 1));
  EXPECT_NE(agents_.back()->log().find(
                "registered as gpu-node with 1 slots and GPUs 0"),
            std::string::npos)
      << agents_.back()->log();
}

// A coordinator killed while CUDA jobs run: the next one stops their ranks,
// relaunches both, and counts each GPU once.
TEST_F(GpuSchedulingTest, CoordinatorRestartKeepsGpuAccounting) {
  ASSERT_NO_FATAL_FAILURE(StartServer({"--slots=1", "--gpus=0,1"}));
  const v1::Job a = Submit(Spec("a", "device: cuda"));
  const v1::Job b = Submit(Spec("b", "device: cuda"));
  ASSERT_EQ(RanksOf(a.id(), 1).size(), 1u) << server_->log();
  ASSERT_EQ(RanksOf(b.id(), 1).size(), 1u) << server_->log();
  server_->Stop(SIGKILL);

  ASSERT_NO_FATAL_FAILURE(StartServer({"--slots=1", "--gpus=0,1"}));
  const auto again_a = RanksOf(a.id(), 1, "2"),
             again_b = RanksOf(b.id(), 1, "2");
  ASSERT_EQ(again_a.size(), 1u) << server_->log();
  ASSERT_EQ(again_b.size(), 1u) << server_->log();
  EXPECT_EQ(std::set<std::string>({again_a.at("0").cuda, again_b.at("0").cuda}),
            std::set<std::string>({"0", "1"}));
  EXPECT_TRUE(GpusAre(2, 0));
  // Only the relaunched ranks run: the first coordinator's were stopped.
  EXPECT_EQ(::momentum::testing::ChildrenOf(server_->pid()).size(), 2u);
  const v1::Job c = Submit(Spec("c", "device: cuda"));
  EXPECT_EQ(Get(c.id()).state(), v1::JOB_STATE_PENDING);
  for (const v1::Job& job : {a, b}) Release(job.id());
  ASSERT_EQ(RanksOf(c.id(), 1).size(), 1u) << server_->log();
  Release(c.id());
  EXPECT_TRUE(GpusAre(0, 2));
}

// --gpus takes auto, none or distinct indices; anything else stops the
// binary before it serves, with a message that names the flag.
TEST_F(GpuSchedulingTest, BadGpusFlagIsRefusedNamingIt) {
  const std::string rule =
      ": --gpus must be auto, none or a comma list of distinct GPU indices "
      ">= 0 (e.g. 0,1,3), got ";
  struct Case {
    std::vector<std::string> args;
    std::string says;
  };
  const Case cases[] = {
      {{BinaryDir() + "/server/momentum-server", "--listen=127.0.0.1:0",
        "--metrics-listen=127.0.0.1:0", "--state-dir=" + dir_ + "/state",
        "--gpus=0,0"},
       "momentum-server" + rule + "\"0,0\": GPU 0 is listed twice"},
      {{BinaryDir() + "/server/momentum-agent", "--server=127.0.0.1:1",
        "--gpus=first"},
       "momentum-agent" + rule + "\"first\": \"first\" is not a GPU index"},
  };
  for (const Case& c : cases) {
    Process refused(c.args, dir_ + "/refused.log");
    EXPECT_EQ(refused.WaitForExit(), 2) << c.args[0];
    EXPECT_NE(refused.log().find(c.says), std::string::npos) << refused.log();
    fs::remove(dir_ + "/refused.log");
  }
  // The server stopped before it opened its store.
  EXPECT_FALSE(fs::exists(dir_ + "/state/jobs.db"));
}

}  // namespace
}  // namespace momentum::server
