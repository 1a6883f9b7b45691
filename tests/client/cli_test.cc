// Runs the built `momentum` binary ($MOMENTUM_BINARY_DIR/client/momentum) as
// a subprocess: against a fake JobService on 127.0.0.1:0 for what each
// command prints and returns, and against addresses that refuse or never
// answer for its errors and deadlines.
#include <fcntl.h>
#include <netinet/in.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "momentum/v1/jobs.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "tests/proc_util.h"

namespace momentum::client {
namespace {

namespace v1 = ::momentum::v1;
using ::momentum::testing::ReadFile;
using ::testing::HasSubstr;
using ::testing::StartsWith;

// 2024-05-01T12:00:00Z.
constexpr int64_t kNoon = 1714564800;

// Answers from fixed data and records the requests. Thread-safe: gRPC calls
// it on its threads while the test reads the requests after the subprocess
// ended.
class FakeJobService final : public v1::JobService::Service {
 public:
  void AddJob(const v1::Job& job) {
    std::lock_guard<std::mutex> lock(mu_);
    jobs_.push_back(job);
  }
  void SetSubmitAnswer(grpc::Status status, v1::Job job) {
    std::lock_guard<std::mutex> lock(mu_);
    submit_status_ = std::move(status);
    submit_job_ = std::move(job);
  }
  void SetWatchEvents(std::vector<v1::WatchJobEvent> events) {
    std::lock_guard<std::mutex> lock(mu_);
    watch_events_ = std::move(events);
  }
  void SetLogLines(std::vector<v1::LogLine> lines) {
    std::lock_guard<std::mutex> lock(mu_);
    log_lines_ = std::move(lines);
  }
  std::vector<v1::SubmitJobRequest> submits() {
    std::lock_guard<std::mutex> lock(mu_);
    return submits_;
  }
  std::vector<v1::ListJobsRequest> lists() {
    std::lock_guard<std::mutex> lock(mu_);
    return lists_;
  }
  std::vector<v1::CancelJobRequest> cancels() {
    std::lock_guard<std::mutex> lock(mu_);
    return cancels_;
  }
  std::vector<v1::WatchJobRequest> watches() {
    std::lock_guard<std::mutex> lock(mu_);
    return watches_;
  }
  std::vector<v1::GetJobLogsRequest> log_requests() {
    std::lock_guard<std::mutex> lock(mu_);
    return log_requests_;
  }

  grpc::Status SubmitJob(grpc::ServerContext*,
                         const v1::SubmitJobRequest* request,
                         v1::SubmitJobResponse* response) override {
    std::lock_guard<std::mutex> lock(mu_);
    submits_.push_back(*request);
    if (submit_status_.ok()) *response->mutable_job() = submit_job_;
    return submit_status_;
  }

  grpc::Status GetJob(grpc::ServerContext*, const v1::GetJobRequest* request,
                      v1::Job* response) override {
    std::lock_guard<std::mutex> lock(mu_);
    const v1::Job* job = FindLocked(request->job_id());
    if (job == nullptr) return NotFound(request->job_id());
    *response = *job;
    return grpc::Status::OK;
  }

  // Pages by position: the token is the index of the page's first job.
  grpc::Status ListJobs(grpc::ServerContext*,
                        const v1::ListJobsRequest* request,
                        v1::ListJobsResponse* response) override {
    std::lock_guard<std::mutex> lock(mu_);
    lists_.push_back(*request);
    const size_t size = request->page_size() > 0 ? request->page_size() : 50;
    const size_t first =
        request->page_token().empty() ? 0 : std::stoul(request->page_token());
    for (size_t i = first; i < jobs_.size() && i < first + size; ++i) {
      *response->add_jobs() = jobs_[i];
    }
    if (first + size < jobs_.size()) {
      response->set_next_page_token(std::to_string(first + size));
    }
    response->set_total_size(static_cast<int>(jobs_.size()));
    return grpc::Status::OK;
  }

  grpc::Status CancelJob(grpc::ServerContext*,
                         const v1::CancelJobRequest* request,
                         v1::CancelJobResponse* response) override {
    std::lock_guard<std::mutex> lock(mu_);
    cancels_.push_back(*request);
    v1::Job* job = FindLocked(request->job_id());
    if (job == nullptr) return NotFound(request->job_id());
    job->set_state(v1::JOB_STATE_CANCELLED);
    job->set_state_reason(request->reason().empty() ? "cancelled by request"
                                                    : request->reason());
    *response->mutable_job() = *job;
    return grpc::Status::OK;
  }

  grpc::Status WatchJob(
      grpc::ServerContext*, const v1::WatchJobRequest* request,
      grpc::ServerWriter<v1::WatchJobEvent>* writer) override {
    std::vector<v1::WatchJobEvent> events;
    {
      std::lock_guard<std::mutex> lock(mu_);
      watches_.push_back(*request);
      if (FindLocked(request->job_id()) == nullptr) {
        return NotFound(request->job_id());
      }
      events = watch_events_;
    }
    for (const v1::WatchJobEvent& event : events) writer->Write(event);
    return grpc::Status::OK;
  }

  grpc::Status GetJobLogs(grpc::ServerContext*,
                          const v1::GetJobLogsRequest* request,
                          grpc::ServerWriter<v1::LogLine>* writer) override {
    std::vector<v1::LogLine> lines;
    {
      std::lock_guard<std::mutex> lock(mu_);
      log_requests_.push_back(*request);
      if (FindLocked(request->job_id()) == nullptr) {
        return NotFound(request->job_id());
      }
      lines = log_lines_;
    }
    for (const v1::LogLine& line : lines) {
      if (request->rank() >= 0 && line.rank() != request->rank()) continue;
      if (line.line_number() < request->from_line()) continue;
      writer->Write(line);
    }
    return grpc::Status::OK;
  }

 private:
  static grpc::Status NotFound(const std::string& id) {
    return grpc::Status(grpc::StatusCode::NOT_FOUND, "no job " + id);
  }
  v1::Job* FindLocked(const std::string& id) {
    for (v1::Job& job : jobs_) {
      if (job.id() == id) return &job;
    }
    return nullptr;
  }

  std::mutex mu_;
  std::vector<v1::Job> jobs_;
  grpc::Status submit_status_;
  v1::Job submit_job_;
  std::vector<v1::WatchJobEvent> watch_events_;
  std::vector<v1::LogLine> log_lines_;
  std::vector<v1::SubmitJobRequest> submits_;
  std::vector<v1::ListJobsRequest> lists_;
  std::vector<v1::CancelJobRequest> cancels_;
  std::vector<v1::WatchJobRequest> watches_;
  std::vector<v1::GetJobLogsRequest> log_requests_;
};

struct RunResult {
  int exit_code = -1;
  std::string out;
  std::string err;
  double seconds = 0;
};

std::string MomentumBinary() {
  const char* dir = std::getenv("MOMENTUM_BINARY_DIR");
  return std::string(dir != nullptr ? dir : ".") + "/client/momentum";
}

// Runs the binary with `args`, stdin from /dev/null and stdout and stderr
// into files, in an environment holding only `env` (no MOMENTUM_SERVER from
// the caller's). posix_spawn rather than fork: this process runs gRPC
// threads.
RunResult RunMomentum(const std::vector<std::string>& args,
                      const std::vector<std::string>& env = {}) {
  static int counter = 0;
  const std::string base = ::testing::TempDir() + "/momentum_cli_" +
                           std::to_string(getpid()) + "_" +
                           std::to_string(counter++);
  const std::string out_path = base + ".out";
  const std::string err_path = base + ".err";
  const std::string binary = MomentumBinary();

  std::vector<char*> argv;
  argv.push_back(const_cast<char*>(binary.c_str()));
  for (const std::string& arg : args) {
    argv.push_back(const_cast<char*>(arg.c_str()));
  }
  argv.push_back(nullptr);
  std::vector<char*> envp;
  for (const std::string& var : env) {
    envp.push_back(const_cast<char*>(var.c_str()));
  }
  envp.push_back(nullptr);

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 1, out_path.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&actions, 2, err_path.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  RunResult run;
  const auto start = std::chrono::steady_clock::now();
  pid_t pid;
  const int spawned = posix_spawn(&pid, binary.c_str(), &actions, nullptr,
                                  argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  if (spawned != 0) {
    ADD_FAILURE() << "cannot run " << binary << ": " << std::strerror(spawned);
    return run;
  }
  // No test should take a minute; one that does is hanging.
  int status = 0;
  while (waitpid(pid, &status, WNOHANG) == 0) {
    if (std::chrono::steady_clock::now() - start > std::chrono::seconds(60)) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      ADD_FAILURE() << "momentum did not end within 60 s";
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  run.seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
          .count();
  run.exit_code =
      WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  run.out = ReadFile(out_path);
  run.err = ReadFile(err_path);
  std::remove(out_path.c_str());
  std::remove(err_path.c_str());
  return run;
}

// A TCP port on 127.0.0.1 with a socket bound to it: `listen` false refuses
// connections; true accepts them into the backlog and never answers.
class TestPort {
 public:
  explicit TestPort(bool listen) {
    fd_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    address.sin_port = 0;
    EXPECT_EQ(bind(fd_, reinterpret_cast<sockaddr*>(&address), sizeof(address)),
              0);
    socklen_t size = sizeof(address);
    getsockname(fd_, reinterpret_cast<sockaddr*>(&address), &size);
    port_ = ntohs(address.sin_port);
    if (listen) {
      EXPECT_EQ(::listen(fd_, 16), 0);
    }
  }
  ~TestPort() { close(fd_); }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }

 private:
  int fd_ = -1;
  int port_ = 0;
};

int CountLines(const std::string& text) {
  return static_cast<int>(std::count(text.begin(), text.end(), '\n'));
}

google::protobuf::Timestamp At(int64_t seconds) {
  google::protobuf::Timestamp time;
  time.set_seconds(seconds);
  return time;
}

v1::Job MakeJob(const std::string& id, const std::string& name,
                v1::JobState state) {
  v1::Job job;
  job.set_id(id);
  job.set_name(name);
  job.set_state(state);
  job.set_world_size(2);
  *job.mutable_submit_time() = At(kNoon);
  job.mutable_progress()->set_eta_seconds(-1);
  job.mutable_progress()->set_knn_top1(-1);
  return job;
}

class CliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(),
                             &port);
    builder.RegisterService(&service_);
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    ASSERT_GT(port, 0);
    address_ = "127.0.0.1:" + std::to_string(port);
  }
  void TearDown() override {
    if (server_) {
      server_->Shutdown(std::chrono::system_clock::now() +
                        std::chrono::seconds(5));
    }
  }

  // Runs `momentum` with the fake server's address after the arguments.
  RunResult Momentum(std::vector<std::string> args) {
    args.push_back("--server");
    args.push_back(address_);
    return RunMomentum(args);
  }

  std::string WriteSpec(const std::string& text) {
    const std::string path = ::testing::TempDir() + "/momentum_cli_spec_" +
                             std::to_string(getpid()) + ".yaml";
    std::ofstream(path) << text;
    return path;
  }

  // A job that trains, restarts once and ends in `final_state`.
  void ScriptWatch(const v1::Job& job, v1::JobState final_state,
                   const std::string& final_reason) {
    std::vector<v1::WatchJobEvent> events(1);
    *events.back().mutable_job() = job;
    auto change = [&events](v1::JobState from, v1::JobState to,
                            const std::string& reason) {
      events.emplace_back();
      events.back().mutable_state_change()->set_from(from);
      events.back().mutable_state_change()->set_to(to);
      events.back().mutable_state_change()->set_reason(reason);
    };
    auto metric = [&events](int rank, int64_t step, double loss, double knn) {
      events.emplace_back();
      v1::MetricSample& sample = *events.back().mutable_metric();
      sample.set_rank(rank);
      sample.set_step(step);
      sample.set_epoch(step / 100.0);
      sample.set_fraction(step / 1000.0);
      sample.set_loss(loss);
      sample.set_images_per_second(800);
      sample.set_eta_seconds(65);
      sample.set_knn_top1(knn);
    };
    change(v1::JOB_STATE_PENDING, v1::JOB_STATE_RUNNING, "launched 2 ranks");
    metric(0, 100, 6.25, -1);
    metric(1, 100, 6.5, -1);
    // All within 5 s of the first: no more progress lines through a pipe.
    metric(0, 200, 5.5, 0.42);
    change(v1::JOB_STATE_RUNNING, v1::JOB_STATE_RESTARTING,
           "rank 1 exited with code 1");
    change(v1::JOB_STATE_RESTARTING, v1::JOB_STATE_RUNNING,
           "relaunched from step 200");
    change(v1::JOB_STATE_RUNNING, final_state, final_reason);
    events.emplace_back();
    v1::Job& last = *events.back().mutable_job();
    last = job;
    last.set_state(final_state);
    last.set_state_reason(final_reason);
    last.set_restarts(1);
    *last.mutable_start_time() = At(kNoon + 5);
    *last.mutable_end_time() = At(kNoon + 5 + 185);
    last.mutable_progress()->set_step(1000);
    last.mutable_progress()->set_epoch(10);
    last.mutable_progress()->set_fraction(1);
    last.mutable_progress()->set_knn_top1(0.7134);
    if (final_state == v1::JOB_STATE_SUCCEEDED) {
      last.set_export_path("/runs/job-3/backbone.pt");
    }
    service_.SetWatchEvents(events);
  }

  FakeJobService service_;
  std::unique_ptr<grpc::Server> server_;
  std::string address_;
};

TEST(CliUsageTest, HelpExitsZero) {
  RunResult run = RunMomentum({"--help"});
  EXPECT_EQ(run.exit_code, 0) << run.err;
  EXPECT_THAT(run.out, HasSubstr("submit"));
  EXPECT_THAT(run.out, HasSubstr("--server"));
  run = RunMomentum({"logs", "--help"});
  EXPECT_EQ(run.exit_code, 0) << run.err;
  EXPECT_THAT(run.out, HasSubstr("--follow"));
}

TEST(CliUsageTest, UsageErrorsExitTwo) {
  EXPECT_EQ(RunMomentum({}).exit_code, 2);
  EXPECT_EQ(RunMomentum({"frobnicate"}).exit_code, 2);
  EXPECT_EQ(RunMomentum({"get"}).exit_code, 2);
  EXPECT_EQ(RunMomentum({"--output", "xml", "list"}).exit_code, 2);
  EXPECT_EQ(RunMomentum({"list", "--limit", "0"}).exit_code, 2);
  EXPECT_EQ(RunMomentum({"list", "--timeout", "-1"}).exit_code, 2);
  EXPECT_EQ(RunMomentum({"submit", "job.yaml", "--set", "novalue"}).exit_code,
            2);
  RunResult run = RunMomentum({"list", "--state", "sleeping"});
  EXPECT_EQ(run.exit_code, 2);
  EXPECT_THAT(run.err, HasSubstr("sleeping"));
}

TEST(CliConnectionTest, RefusedConnectionFailsAtOnceNamingTheAddress) {
  TestPort port(/*listen=*/false);
  RunResult run =
      RunMomentum({"list", "--server", port.address(), "--timeout", "20"});
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_EQ(run.out, "");
  EXPECT_THAT(run.err, StartsWith("momentum: ListJobs: UNAVAILABLE: "));
  EXPECT_THAT(run.err, HasSubstr(port.address()));
  EXPECT_EQ(CountLines(run.err), 1) << run.err;
  EXPECT_LT(run.seconds, 10);
}

TEST(CliConnectionTest, PortOneAsInTheDocs) {
  RunResult run =
      RunMomentum({"list", "--server", "127.0.0.1:1", "--timeout", "5"});
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_THAT(run.err, HasSubstr("127.0.0.1:1"));
  EXPECT_EQ(CountLines(run.err), 1) << run.err;
  EXPECT_LT(run.seconds, 5);
}

TEST(CliConnectionTest, StreamsFailAtOnceWhenRefused) {
  TestPort port(/*listen=*/false);
  // `logs --rank` goes straight to the stream (no GetJob first).
  const std::vector<std::vector<std::string>> commands = {
      {"watch", "job-1", "--server", port.address()},
      {"logs", "job-1", "--rank", "0", "--server", port.address()}};
  for (const auto& command : commands) {
    RunResult run = RunMomentum(command);
    EXPECT_EQ(run.exit_code, 1) << command[0];
    EXPECT_THAT(run.err, HasSubstr(": UNAVAILABLE: ")) << command[0];
    EXPECT_THAT(run.err, HasSubstr(port.address())) << command[0];
    EXPECT_EQ(CountLines(run.err), 1) << run.err;
    EXPECT_LT(run.seconds, 5) << command[0];
  }
}

TEST(CliConnectionTest, SilentServerEndsAtTheTimeout) {
  TestPort port(/*listen=*/true);
  RunResult get = RunMomentum(
      {"get", "job-1", "--server", port.address(), "--timeout", "1"});
  EXPECT_EQ(get.exit_code, 1);
  EXPECT_EQ(get.err, "momentum: GetJob: DEADLINE_EXCEEDED: no answer from " +
                         port.address() + " within 1s\n");
  EXPECT_GE(get.seconds, 0.9);
  EXPECT_LT(get.seconds, 5);

  RunResult watch = RunMomentum(
      {"watch", "job-1", "--server", port.address(), "--timeout", "1"});
  EXPECT_EQ(watch.exit_code, 1);
  EXPECT_EQ(watch.err,
            "momentum: WatchJob: DEADLINE_EXCEEDED: no connection to " +
                port.address() + " within 1s\n");
  EXPECT_LT(watch.seconds, 5);
}

TEST_F(CliTest, ServerFromEnvironment) {
  RunResult run = RunMomentum({"list"}, {"MOMENTUM_SERVER=" + address_});
  EXPECT_EQ(run.exit_code, 0) << run.err;
  EXPECT_EQ(run.out, "no jobs\n");
}

TEST_F(CliTest, SubmitSendsFileAndOverrides) {
  v1::Job job = MakeJob("job-3", "fashion-mnist", v1::JOB_STATE_PENDING);
  job.set_queue_position(1);
  service_.SetSubmitAnswer(grpc::Status::OK, job);
  const std::string spec =
      WriteSpec("name: fashion-mnist\noptim:\n  epochs: 2\n");
  RunResult run =
      Momentum({"submit", spec, "--set", "optim.epochs=1", "--set", "seed=7"});
  EXPECT_EQ(run.exit_code, 0) << run.err;
  EXPECT_EQ(run.out,
            "submitted job-3 (fashion-mnist), PENDING, queue position 1\n");
  EXPECT_EQ(run.err, "");
  ASSERT_EQ(service_.submits().size(), 1u);
  EXPECT_EQ(service_.submits()[0].spec_yaml(),
            "name: fashion-mnist\noptim:\n  epochs: 2\n");
  EXPECT_THAT(service_.submits()[0].overrides(),
              ::testing::ElementsAre("optim.epochs=1", "seed=7"));
}

TEST_F(CliTest, SubmitJsonIsTheJob) {
  v1::Job job = MakeJob("job-3", "fashion-mnist", v1::JOB_STATE_PENDING);
  service_.SetSubmitAnswer(grpc::Status::OK, job);
  RunResult run = Momentum({"--output", "json", "submit", WriteSpec("{}\n")});
  EXPECT_EQ(run.exit_code, 0) << run.err;
  nlohmann::json json = nlohmann::json::parse(run.out);
  EXPECT_EQ(json["id"], "job-3");
  EXPECT_EQ(json["state"], "JOB_STATE_PENDING");
  EXPECT_EQ(json["queue_position"], 0);
}

TEST_F(CliTest, SubmitRejectedSpecIsOneLine) {
  service_.SetSubmitAnswer(
      grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                   "<spec>: moco.temperature must be > 0, got -1"),
      v1::Job());
  RunResult run = Momentum({"submit", WriteSpec("moco:\n  temperature: -1\n")});
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_EQ(run.out, "");
  EXPECT_EQ(run.err,
            "momentum: SubmitJob: INVALID_ARGUMENT: <spec>: moco.temperature "
            "must be > 0, got -1\n");
}

TEST_F(CliTest, SubmitUnreadableFileNamesIt) {
  RunResult run = Momentum({"submit", "/nonexistent/job.yaml"});
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_EQ(run.err,
            "momentum: cannot read /nonexistent/job.yaml: No such file or "
            "directory\n");
  EXPECT_TRUE(service_.submits().empty());
}

TEST_F(CliTest, SubmitWaitWatchesUntilTheEnd) {
  v1::Job job = MakeJob("job-3", "fashion-mnist", v1::JOB_STATE_PENDING);
  job.set_queue_position(1);
  service_.AddJob(job);
  service_.SetSubmitAnswer(grpc::Status::OK, job);
  ScriptWatch(job, v1::JOB_STATE_SUCCEEDED, "trained 10 epochs");
  RunResult run = Momentum({"submit", WriteSpec("{}\n"), "--wait"});
  EXPECT_EQ(run.exit_code, 0) << run.err;
  EXPECT_EQ(run.out,
            "submitted job-3 (fashion-mnist), PENDING, queue position 1\n"
            "job-3 PENDING\n"
            "job-3 PENDING -> RUNNING: launched 2 ranks\n"
            "RUNNING 10%  epoch 1.0 step 100 loss 6.25  800 img/s  ETA 1m05s\n"
            "job-3 RUNNING -> RESTARTING: rank 1 exited with code 1\n"
            "job-3 RESTARTING -> RUNNING: relaunched from step 200\n"
            "job-3 SUCCEEDED: trained 10 epochs\n"
            "  steps:     1000\n"
            "  kNN top-1: 71.3%\n"
            "  export:    /runs/job-3/backbone.pt\n"
            "  wall time: 3m05s\n"
            "  restarts:  1\n");
  ASSERT_EQ(service_.watches().size(), 1u);
  EXPECT_EQ(service_.watches()[0].job_id(), "job-3");
  EXPECT_TRUE(service_.watches()[0].metrics());
}

TEST_F(CliTest, WatchFailedJobExitsOneWithTheReason) {
  v1::Job job = MakeJob("job-3", "fashion-mnist", v1::JOB_STATE_PENDING);
  service_.AddJob(job);
  ScriptWatch(job, v1::JOB_STATE_FAILED, "rank 0 exited with code 1: boom");
  RunResult run = Momentum({"watch", "job-3"});
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_THAT(run.out,
              HasSubstr("job-3 FAILED: rank 0 exited with code 1: boom\n"));
  EXPECT_THAT(run.out, HasSubstr("  export:    -\n"));
}

TEST_F(CliTest, WatchCancelledJobExitsOne) {
  v1::Job job = MakeJob("job-3", "fashion-mnist", v1::JOB_STATE_PENDING);
  service_.AddJob(job);
  ScriptWatch(job, v1::JOB_STATE_CANCELLED, "cancelled by request");
  EXPECT_EQ(Momentum({"watch", "job-3"}).exit_code, 1);
}

TEST_F(CliTest, WatchJsonPrintsEachEventAsALine) {
  v1::Job job = MakeJob("job-3", "fashion-mnist", v1::JOB_STATE_PENDING);
  service_.AddJob(job);
  ScriptWatch(job, v1::JOB_STATE_FAILED, "rank 0 exited with code 1: boom");
  RunResult run = Momentum({"watch", "job-3", "--output", "json"});
  EXPECT_EQ(run.exit_code, 1);
  std::istringstream lines(run.out);
  std::string line;
  std::vector<nlohmann::json> events;
  while (std::getline(lines, line))
    events.push_back(nlohmann::json::parse(line));
  ASSERT_EQ(events.size(), 9u) << run.out;
  EXPECT_EQ(events[0]["job"]["id"], "job-3");
  EXPECT_EQ(events[1]["state_change"]["to"], "JOB_STATE_RUNNING");
  EXPECT_EQ(events[2]["metric"]["step"], "100");
  EXPECT_EQ(events[8]["job"]["state"], "JOB_STATE_FAILED");
  EXPECT_EQ(run.err,
            "momentum: job-3 FAILED: rank 0 exited with code 1: boom\n");
}

TEST_F(CliTest, WatchUnknownJob) {
  RunResult run = Momentum({"watch", "job-9"});
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_EQ(run.err, "momentum: WatchJob: NOT_FOUND: no job job-9\n");
}

TEST_F(CliTest, WatchStreamThatEndsEarlyIsAnError) {
  v1::Job job = MakeJob("job-3", "fashion-mnist", v1::JOB_STATE_RUNNING);
  service_.AddJob(job);
  std::vector<v1::WatchJobEvent> events(1);
  *events[0].mutable_job() = job;
  service_.SetWatchEvents(events);
  RunResult run = Momentum({"watch", "job-3"});
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_EQ(run.out, "job-3 RUNNING\n");
  EXPECT_THAT(run.err, StartsWith("momentum: WatchJob: UNAVAILABLE: the stream "
                                  "ended while job-3 was RUNNING"));
  EXPECT_EQ(CountLines(run.err), 1);
}

TEST_F(CliTest, ListTable) {
  v1::Job failed = MakeJob("job-1", "tiny", v1::JOB_STATE_FAILED);
  failed.set_priority(-1);
  failed.set_world_size(1);
  *failed.mutable_start_time() = At(kNoon + 10);
  *failed.mutable_end_time() = At(kNoon + 22);
  failed.mutable_progress()->set_step(3);
  failed.mutable_progress()->set_epoch(0.05);
  failed.mutable_progress()->set_loss(9.2);
  v1::Job done = MakeJob("job-2", "fashion-mnist", v1::JOB_STATE_SUCCEEDED);
  *done.mutable_start_time() = At(kNoon + 10);
  *done.mutable_end_time() = At(kNoon + 10 + 3725);
  done.mutable_progress()->set_step(4690);
  done.mutable_progress()->set_epoch(10);
  done.mutable_progress()->set_loss(4.812);
  done.mutable_progress()->set_knn_top1(0.7134);
  v1::Job pending = MakeJob("job-10", "r50", v1::JOB_STATE_PENDING);
  pending.set_world_size(8);
  pending.set_queue_position(2);
  pending.clear_submit_time();
  service_.AddJob(pending);
  service_.AddJob(done);
  service_.AddJob(failed);
  RunResult run = Momentum({"list"});
  EXPECT_EQ(run.exit_code, 0) << run.err;
  EXPECT_EQ(run.out,
            "ID      NAME           STATE      PRIORITY  RANKS  QUEUE  "
            "PROGRESS                        KNN    AGE/DURATION\n"
            "job-10  r50            PENDING    0         8      2      "
            "-                               -      -\n"
            "job-2   fashion-mnist  SUCCEEDED  0         2      -      "
            "epoch 10.0 step 4690 loss 4.81  71.3%  1h02m\n"
            "job-1   tiny           FAILED     -1        1      -      "
            "epoch 0.0 step 3 loss 9.20      -      12s\n");
  EXPECT_EQ(run.err, "");
}

TEST_F(CliTest, ListFiltersAndFirstPageOnly) {
  for (int i = 1; i <= 5; ++i) {
    service_.AddJob(
        MakeJob("job-" + std::to_string(i), "n", v1::JOB_STATE_SUCCEEDED));
  }
  RunResult run =
      Momentum({"list", "--state", "running", "--state", "FAILED", "--state",
                "job_state_pending", "--name", "mnist", "--limit", "2"});
  EXPECT_EQ(run.exit_code, 0) << run.err;
  EXPECT_EQ(CountLines(run.out), 3) << run.out;
  EXPECT_EQ(run.err, "showing 2 of 5 jobs; --all-pages lists them all\n");
  ASSERT_EQ(service_.lists().size(), 1u);
  const v1::ListJobsRequest request = service_.lists()[0];
  EXPECT_THAT(request.states(), ::testing::ElementsAre(v1::JOB_STATE_RUNNING,
                                                       v1::JOB_STATE_FAILED,
                                                       v1::JOB_STATE_PENDING));
  EXPECT_EQ(request.name_contains(), "mnist");
  EXPECT_EQ(request.page_size(), 2);
  EXPECT_EQ(request.page_token(), "");
}

TEST_F(CliTest, ListAllPagesJson) {
  for (int i = 1; i <= 5; ++i) {
    service_.AddJob(
        MakeJob("job-" + std::to_string(i), "n", v1::JOB_STATE_SUCCEEDED));
  }
  RunResult run =
      Momentum({"list", "--all-pages", "--limit", "2", "--output", "json"});
  EXPECT_EQ(run.exit_code, 0) << run.err;
  nlohmann::json json = nlohmann::json::parse(run.out);
  ASSERT_EQ(json["jobs"].size(), 5u);
  EXPECT_EQ(json["jobs"][4]["id"], "job-5");
  EXPECT_EQ(json["next_page_token"], "");
  EXPECT_EQ(json["total_size"], 5);
  ASSERT_EQ(service_.lists().size(), 3u);
  EXPECT_EQ(service_.lists()[1].page_token(), "2");
  EXPECT_EQ(service_.lists()[2].page_token(), "4");
}

TEST_F(CliTest, GetShowsFieldsAndSpecOnRequest) {
  v1::Job job = MakeJob("job-3", "fashion-mnist", v1::JOB_STATE_PENDING);
  job.set_spec_yaml("name: fashion-mnist\nseed: 1\n");
  service_.AddJob(job);
  RunResult run = Momentum({"get", "job-3"});
  EXPECT_EQ(run.exit_code, 0) << run.err;
  EXPECT_THAT(run.out, StartsWith("id:                         job-3\n"));
  EXPECT_THAT(run.out, HasSubstr("\nstate:                      PENDING\n"));
  EXPECT_THAT(
      run.out,
      HasSubstr("\nsubmit_time:                2024-05-01T12:00:00Z\n"));
  EXPECT_THAT(run.out, ::testing::Not(HasSubstr("seed")));
  run = Momentum({"get", "job-3", "--spec"});
  EXPECT_THAT(run.out, ::testing::EndsWith(
                           "spec_yaml:\n  name: fashion-mnist\n  seed: 1\n"));
  run = Momentum({"get", "job-3", "--output", "json"});
  EXPECT_EQ(nlohmann::json::parse(run.out)["spec_yaml"],
            "name: fashion-mnist\nseed: 1\n");
}

TEST_F(CliTest, GetUnknownJob) {
  RunResult run = Momentum({"get", "job-9"});
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_EQ(run.out, "");
  EXPECT_EQ(run.err, "momentum: GetJob: NOT_FOUND: no job job-9\n");
}

TEST_F(CliTest, CancelPrintsNewState) {
  service_.AddJob(MakeJob("job-3", "fashion-mnist", v1::JOB_STATE_RUNNING));
  RunResult run =
      Momentum({"cancel", "job-3", "--reason", "wrong learning rate"});
  EXPECT_EQ(run.exit_code, 0) << run.err;
  EXPECT_EQ(run.out, "job-3 CANCELLED: wrong learning rate\n");
  ASSERT_EQ(service_.cancels().size(), 1u);
  EXPECT_EQ(service_.cancels()[0].reason(), "wrong learning rate");
  run = Momentum({"cancel", "job-9"});
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_EQ(run.err, "momentum: CancelJob: NOT_FOUND: no job job-9\n");
}

std::vector<v1::LogLine> TwoRankLog() {
  std::vector<v1::LogLine> lines;
  for (int rank = 0; rank < 2; ++rank) {
    for (int n = 1; n <= 2; ++n) {
      v1::LogLine line;
      line.set_rank(rank);
      line.set_line_number(n);
      line.set_text("r" + std::to_string(rank) + " line " + std::to_string(n));
      lines.push_back(line);
    }
  }
  return lines;
}

TEST_F(CliTest, LogsOfSeveralRanksArePrefixed) {
  service_.AddJob(MakeJob("job-3", "fashion-mnist", v1::JOB_STATE_RUNNING));
  service_.SetLogLines(TwoRankLog());
  RunResult run = Momentum({"logs", "job-3"});
  EXPECT_EQ(run.exit_code, 0) << run.err;
  EXPECT_EQ(run.out,
            "[rank 0] r0 line 1\n[rank 0] r0 line 2\n"
            "[rank 1] r1 line 1\n[rank 1] r1 line 2\n");
  ASSERT_EQ(service_.log_requests().size(), 1u);
  EXPECT_EQ(service_.log_requests()[0].rank(), -1);
  EXPECT_FALSE(service_.log_requests()[0].follow());
}

// A rank's output is another program's: its escape sequences ("\x1b[2J"
// clears the screen) are printed as visible text, not run by the terminal.
TEST_F(CliTest, LogLinesAndServerTextArePrintedEscaped) {
  v1::Job job = MakeJob("job-3", "fashion-mnist", v1::JOB_STATE_RUNNING);
  job.set_world_size(1);
  job.set_owner("mallory\x1b[8m");
  service_.AddJob(job);
  v1::LogLine line;
  line.set_rank(0);
  line.set_line_number(1);
  // (U+009B, CSI, in UTF-8: proto strings are UTF-8.)
  line.set_text("epoch 1\x1b[2J\x1b]0;owned\a done\xc2\x9b");
  service_.SetLogLines({line});
  RunResult run = Momentum({"logs", "job-3"});
  EXPECT_EQ(run.exit_code, 0) << run.err;
  EXPECT_EQ(run.out, "epoch 1\\x1b[2J\\x1b]0;owned\\x07 done\\u009b\n");

  run = Momentum({"get", "job-3"});
  EXPECT_EQ(run.exit_code, 0) << run.err;
  EXPECT_THAT(run.out, HasSubstr("\nowner:                      "
                                 "mallory\\x1b[8m\n"));

  // The server's answer to a cancel carries the reason it was given, and
  // its errors repeat what the request said.
  run = Momentum({"cancel", "job-3", "--reason", "bye\x1b[2J"});
  EXPECT_EQ(run.exit_code, 0) << run.err;
  EXPECT_EQ(run.out, "job-3 CANCELLED: bye\\x1b[2J\n");
  run = Momentum({"get", "job-\x1b[2J"});
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_EQ(run.err, "momentum: GetJob: NOT_FOUND: no job job-\\x1b[2J\n");
}

TEST_F(CliTest, LogsOfOneRankAreRaw) {
  service_.AddJob(MakeJob("job-3", "fashion-mnist", v1::JOB_STATE_RUNNING));
  service_.SetLogLines(TwoRankLog());
  RunResult run =
      Momentum({"logs", "job-3", "--rank", "1", "--from-line", "2", "-f"});
  EXPECT_EQ(run.exit_code, 0) << run.err;
  EXPECT_EQ(run.out, "r1 line 2\n");
  ASSERT_EQ(service_.log_requests().size(), 1u);
  EXPECT_EQ(service_.log_requests()[0].rank(), 1);
  EXPECT_EQ(service_.log_requests()[0].from_line(), 2);
  EXPECT_TRUE(service_.log_requests()[0].follow());
}

TEST_F(CliTest, LogsOfOneRankJobAreRaw) {
  v1::Job job = MakeJob("job-3", "fashion-mnist", v1::JOB_STATE_RUNNING);
  job.set_world_size(1);
  service_.AddJob(job);
  service_.SetLogLines({TwoRankLog()[0]});
  RunResult run = Momentum({"logs", "job-3"});
  EXPECT_EQ(run.out, "r0 line 1\n");
}

TEST_F(CliTest, LogsUnknownJob) {
  RunResult run = Momentum({"logs", "job-9"});
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_EQ(run.err, "momentum: GetJob: NOT_FOUND: no job job-9\n");
}

}  // namespace
}  // namespace momentum::client
