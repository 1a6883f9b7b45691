// Defects of the coordinator found by trying it as a new user would, each
// reproduced against the real momentum-server binary on 127.0.0.1 (ports
// the OS assigns, its real SQLite store) with a fake worker: a shell script
// whose behaviour each test writes. Each failed before its fix.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "momentum/v1/internal.grpc.pb.h"
#include "momentum/v1/jobs.grpc.pb.h"
#include "tests/proc_util.h"
#include "tests/server/test_job_client.h"

namespace momentum::server {
namespace {

namespace fs = std::filesystem;
using ::momentum::server::testing::TestJobClient;
using ::momentum::testing::BinaryDir;
using ::momentum::testing::Eventually;
using ::momentum::testing::Process;
using ::momentum::testing::ReadFile;
using std::chrono::seconds;

class ServerDefectsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char pattern[] = "/tmp/momentum-defects-XXXXXX";
    dir_ = ::mkdtemp(pattern);
  }
  void TearDown() override {
    client_.reset();
    server_.reset();
    fs::remove_all(dir_);
  }

  // The fake worker: `body` is sh run as `momentum-worker --config SPEC`.
  std::string WriteWorker(const std::string& body) {
    const std::string path = dir_ + "/fake-worker.sh";
    std::ofstream(path) << "#!/bin/sh\n" << body << "\n";
    ::chmod(path.c_str(), 0755);
    return path;
  }

  // A server on <dir>/state running `worker`; false when it did not serve.
  bool StartServer(const std::string& worker,
                   const std::vector<std::string>& flags = {},
                   const std::string& name = "server") {
    const std::string ready = dir_ + "/" + name + ".json";
    std::vector<std::string> args = {BinaryDir() + "/server/momentum-server",
                                     "--listen=" + listen_,
                                     "--metrics-listen=127.0.0.1:0",
                                     "--state-dir=" + dir_ + "/state",
                                     "--worker=" + worker,
                                     "--slots=1",
                                     "--gpus=none",
                                     "--ready-file=" + ready};
    args.insert(args.end(), flags.begin(), flags.end());
    server_ = std::make_unique<Process>(args, dir_ + "/" + name + ".log");
    if (!Eventually([&] { return fs::exists(ready); }, seconds(30))) {
      return false;
    }
    address_ = nlohmann::json::parse(ReadFile(ready))["grpc"];
    if (tls_) {
      // The certificate names localhost, not the wildcard it listens on.
      address_ = "localhost" + address_.substr(address_.rfind(':'));
      grpc::SslCredentialsOptions ssl;
      ssl.pem_root_certs = ReadFile(dir_ + "/cert.pem");
      client_ =
          std::make_unique<TestJobClient>(address_, grpc::SslCredentials(ssl));
    } else {
      client_ = std::make_unique<TestJobClient>(address_);
    }
    return true;
  }

  // A fake worker that runs `first`, then waits for Release().
  std::string WaitingWorker(const std::string& first) {
    return WriteWorker(first + "\nwhile [ ! -e " + dir_ +
                       "/release ]; do sleep 0.05; done");
  }
  // Lets the job's waiting ranks end; it succeeds.
  void ReleaseAndExpectSuccess(const std::string& id) {
    EXPECT_EQ(client_->Get(id).state(), v1::JOB_STATE_RUNNING);
    std::ofstream(dir_ + "/release").put('\n');
    EXPECT_TRUE(client_->WaitForState(id, v1::JOB_STATE_SUCCEEDED));
  }

  // Each has an output_dir of its own: live jobs may not share one.
  static std::string Spec(const std::string& extra = "") {
    static int specs = 0;
    return "name: t\noutput_dir: out-" + std::to_string(++specs) +
           "\ndata: {path: /nonexistent}\n"
           "optim: {batch_size: 12}\nresources: {nproc: 1, device: cpu}\n" +
           extra;
  }

  std::string dir_, address_;
  std::string listen_ = "127.0.0.1:0";
  bool tls_ = false;
  std::unique_ptr<Process> server_;
  std::unique_ptr<TestJobClient> client_;
};

// Was: the launch failure called back into the coordinator under its own
// lock; the job stayed RUNNING, cancel and submit timed out, SIGTERM no
// longer stopped the server.
TEST_F(ServerDefectsTest, MissingWorkerBinaryFailsTheJobAndTheServerAnswers) {
  ASSERT_TRUE(StartServer(dir_ + "/no-such-worker"));
  const v1::Job job = client_->Submit(Spec());
  ASSERT_TRUE(client_->WaitForState(job.id(), v1::JOB_STATE_FAILED))
      << client_->Get(job.id()).state_reason() << "\n"
      << server_->log();
  const std::string reason = client_->Get(job.id()).state_reason();
  EXPECT_TRUE(absl::StrContains(reason, "could not be started")) << reason;
  EXPECT_TRUE(absl::StrContains(reason, "no-such-worker")) << reason;
  EXPECT_TRUE(absl::StrContains(reason, "not retried")) << reason;
  EXPECT_EQ(client_->Get(job.id()).restarts(), 0);
  // Still answers: another submission and a cancel.
  v1::Job second;
  ASSERT_TRUE(client_->TrySubmit(Spec(), &second).ok());
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + seconds(5));
  v1::CancelJobRequest cancel;
  cancel.set_job_id(second.id());
  v1::CancelJobResponse cancelled;
  EXPECT_TRUE(client_->stub().CancelJob(&ctx, cancel, &cancelled).ok());
  // And stops on SIGTERM.
  EXPECT_EQ(server_->SignalAndWait(SIGTERM, seconds(30)), 0) << server_->log();
}

// Was: shutdown sent SIGKILL milliseconds after SIGTERM, whatever
// --grace-seconds said, so ranks could not checkpoint.
TEST_F(ServerDefectsTest, ShutdownGivesRanksTheirGrace) {
  const std::string worker =
      WriteWorker("trap 'sleep 1; echo graceful > " + dir_ +
                  "/stopped; exit 143' TERM\n"
                  "touch " +
                  dir_ +
                  "/started\n"
                  "while :; do sleep 0.05; done");
  ASSERT_TRUE(StartServer(worker, {"--grace-seconds=20"}));
  const v1::Job job = client_->Submit(Spec());
  ASSERT_TRUE(Eventually([&] { return fs::exists(dir_ + "/started"); }))
      << server_->log();
  EXPECT_EQ(server_->SignalAndWait(SIGTERM, seconds(30)), 0) << server_->log();
  EXPECT_EQ(ReadFile(dir_ + "/stopped"), "graceful\n");
}

// Was: every rank log stayed open in the server, without close-on-exec, and
// each later rank inherited all of them.
TEST_F(ServerDefectsTest, RanksInheritNoLogFileOfEarlierJobs) {
  const std::string worker = WriteWorker(
      "echo hello from $MOMENTUM_JOB_ID\n"
      "ls -l /proc/$$/fd > " +
      dir_ +
      "/fds-$MOMENTUM_JOB_ID 2>&1\n"
      "exit 0");
  ASSERT_TRUE(StartServer(worker));
  std::string last;
  for (int i = 0; i < 5; ++i) {
    last = client_->Submit(Spec()).id();
    ASSERT_TRUE(client_->WaitForState(last, v1::JOB_STATE_SUCCEEDED))
        << client_->Get(last).state_reason();
  }
  const std::string fds = ReadFile(dir_ + "/fds-" + last);
  ASSERT_FALSE(fds.empty());
  EXPECT_FALSE(absl::StrContains(fds, "rank-0.log")) << fds;
  EXPECT_FALSE(absl::StrContains(fds, "jobs.db")) << fds;
}

// Was: an agent could end ranks it never ran (a job was marked SUCCEEDED
// while its rank kept running) and write logs outside the state directory.
TEST_F(ServerDefectsTest, AgentCannotSpeakForRanksItNeverRan) {
  const std::string worker = WaitingWorker("touch " + dir_ + "/started");
  ASSERT_TRUE(StartServer(worker));
  const v1::Job job = client_->Submit(Spec());
  ASSERT_TRUE(Eventually([&] { return fs::exists(dir_ + "/started"); }));
  ASSERT_EQ(client_->Get(job.id()).state(), v1::JOB_STATE_RUNNING);

  auto internal = v1::InternalService::NewStub(client_->channel());
  grpc::ClientContext ctx;
  auto session = internal->AgentSession(&ctx);
  v1::AgentMessage hello;
  hello.mutable_hello()->set_hostname("rogue");
  hello.mutable_hello()->set_advertise_address("127.0.0.1");
  hello.mutable_hello()->set_slots(1);
  ASSERT_TRUE(session->Write(hello));
  v1::AgentCommand welcome;
  ASSERT_TRUE(session->Read(&welcome));
  v1::AgentMessage exited;
  exited.mutable_exited()->set_job_id(job.id());
  exited.mutable_exited()->set_attempt(1);
  exited.mutable_exited()->set_rank(0);
  exited.mutable_exited()->set_exit_code(0);
  ASSERT_TRUE(session->Write(exited));
  v1::AgentMessage output;
  output.mutable_output()->set_job_id(dir_ + "/escape");
  output.mutable_output()->set_attempt(1);
  output.mutable_output()->set_rank(0);
  output.mutable_output()->add_lines("planted");
  ASSERT_TRUE(session->Write(output));
  session->WritesDone();
  // The server read every message before it ends the session.
  EXPECT_TRUE(session->Finish().ok());

  EXPECT_FALSE(fs::exists(dir_ + "/escape")) << server_->log();
  EXPECT_TRUE(absl::StrContains(server_->log(), "a rank it does not run"));
  ReleaseAndExpectSuccess(job.id());
}

// Was: nothing locked the state directory; a second server on it killed
// the first one's ranks while it recovered.
TEST_F(ServerDefectsTest, SecondServerOnTheStateDirectoryIsRefused) {
  const std::string worker = WaitingWorker("echo $$ > " + dir_ + "/rank.pid");
  ASSERT_TRUE(StartServer(worker));
  const v1::Job job = client_->Submit(Spec());
  ASSERT_TRUE(Eventually([&] { return fs::exists(dir_ + "/rank.pid"); }));
  const pid_t first = server_->pid();
  Process second(
      {BinaryDir() + "/server/momentum-server", "--listen=127.0.0.1:0",
       "--metrics-listen=127.0.0.1:0", "--state-dir=" + dir_ + "/state",
       "--worker=" + worker, "--gpus=none"},
      dir_ + "/second.log");
  EXPECT_EQ(second.WaitForExit(), 1);
  EXPECT_TRUE(absl::StrContains(
      second.log(),
      absl::StrCat("is in use by another momentum-server (pid ", first, ")")))
      << second.log();
  const pid_t rank = std::stoi(ReadFile(dir_ + "/rank.pid"));
  EXPECT_EQ(::kill(rank, 0), 0) << "the first server's rank was stopped";
  ReleaseAndExpectSuccess(job.id());
}

// Was: a line without a newline was split quadratically, kept whole in
// memory and stored as the failure reason (megabytes that broke ListJobs
// for clients with default limits). And a worker exiting "do not retry"
// was restarted max_restarts times.
TEST_F(ServerDefectsTest, EndlessLineAndBadInputExitFailOnceAndBounded) {
  const std::string worker =
      WriteWorker("echo attempt >> " + dir_ +
                  "/attempts\n"
                  "head -c 8000000 /dev/zero | tr '\\0' x\n"
                  "exit 2");
  ASSERT_TRUE(StartServer(worker));
  const v1::Job job = client_->Submit(Spec("scheduling: {max_restarts: 3}\n"));
  ASSERT_TRUE(client_->WaitForState(job.id(), v1::JOB_STATE_FAILED))
      << client_->Get(job.id()).state_reason().substr(0, 200);
  EXPECT_EQ(ReadFile(dir_ + "/attempts"), "attempt\n");
  const std::string reason = client_->Get(job.id()).state_reason();
  EXPECT_LT(reason.size(), 1024u);
  EXPECT_TRUE(absl::StrContains(reason, "exited with code 2 (bad input"))
      << reason.substr(0, 200);
  // Default client limits (4 MB messages) list it.
  grpc::ClientContext ctx;
  v1::ListJobsResponse listed;
  EXPECT_TRUE(
      client_->stub().ListJobs(&ctx, v1::ListJobsRequest(), &listed).ok());
  // The 8 MB are kept, as lines of at most 16 KiB.
  grpc::ClientContext logs_ctx;
  v1::GetJobLogsRequest logs;
  logs.set_job_id(job.id());
  auto reader = client_->stub().GetJobLogs(&logs_ctx, logs);
  v1::LogLine line;
  int64_t bytes = 0, lines = 0;
  while (reader->Read(&line)) {
    EXPECT_LE(line.text().size(), 16384u);
    bytes += static_cast<int64_t>(line.text().size());
    ++lines;
  }
  EXPECT_TRUE(reader->Finish().ok());
  EXPECT_EQ(bytes, 8000000);
  EXPECT_EQ(lines, (8000000 + 16383) / 16384);
}

// Was: an int32 world size of 0 stored for nproc 2^62, at the head of the
// queue forever, and `momentum logs` of it spun a server thread.
TEST_F(ServerDefectsTest, AbsurdSizesAreRefusedAndNothingIsStored) {
  ASSERT_TRUE(StartServer(WriteWorker("exit 0")));
  v1::Job job;
  grpc::Status status = client_->TrySubmit(
      "name: huge\ndata: {path: /d}\n"
      "optim: {batch_size: 4611686018427387904}\n"
      "resources: {nproc: 4611686018427387904}\n"
      "scheduling: {priority: 1000}\n",
      &job);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StrContains(status.error_message(),
                                "resources.nproc must be in [1, 65536]"))
      << status.error_message();
  grpc::ClientContext ctx;
  v1::ListJobsResponse listed;
  ASSERT_TRUE(
      client_->stub().ListJobs(&ctx, v1::ListJobsRequest(), &listed).ok());
  EXPECT_EQ(listed.total_size(), 0);
  // A job behind it is not blocked.
  const v1::Job next = client_->Submit(Spec());
  EXPECT_TRUE(client_->WaitForState(next.id(), v1::JOB_STATE_SUCCEEDED));
}

// Was: every WatchJob and `logs -f` stream held a server thread and queued
// without bound, and nothing limited how many there were.
TEST_F(ServerDefectsTest, WatchStreamsAreLimited) {
  ASSERT_TRUE(StartServer(WaitingWorker("true"), {"--max-watch-streams=2"}))
      << server_->log();
  const v1::Job job = client_->Submit(Spec());
  v1::WatchJobRequest request;
  request.set_job_id(job.id());
  v1::WatchJobEvent event;
  grpc::ClientContext first_ctx, second_ctx, third_ctx;
  auto first = client_->stub().WatchJob(&first_ctx, request);
  auto second = client_->stub().WatchJob(&second_ctx, request);
  ASSERT_TRUE(first->Read(&event));  // the snapshot
  ASSERT_TRUE(second->Read(&event));
  auto third = client_->stub().WatchJob(&third_ctx, request);
  EXPECT_FALSE(third->Read(&event));
  const grpc::Status refused = third->Finish();
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_TRUE(absl::StrContains(refused.error_message(), "--max-watch-streams"))
      << refused.error_message();
  // A closed stream frees its place.
  first_ctx.TryCancel();
  first->Finish();
  EXPECT_TRUE(Eventually([&] {
    grpc::ClientContext ctx;
    auto again = client_->stub().WatchJob(&ctx, request);
    const bool ok = again->Read(&event);
    ctx.TryCancel();
    again->Finish();
    return ok;
  }));
  second_ctx.TryCancel();
  second->Finish();
  ReleaseAndExpectSuccess(job.id());
}

// Was: with --listen 0.0.0.0:PORT, ranks were told to report their metrics
// to 0.0.0.0:PORT, which cannot be connected to.
TEST_F(ServerDefectsTest, RanksAreToldAnAddressTheyCanReach) {
  // Not on loopback, the server wants TLS: a self-signed certificate.
  const std::string openssl =
      "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost "
      "-addext subjectAltName=DNS:localhost,IP:127.0.0.1 -keyout " +
      dir_ + "/key.pem -out " + dir_ + "/cert.pem > " + dir_ +
      "/openssl.log 2>&1";
  ASSERT_EQ(std::system(openssl.c_str()), 0) << ReadFile(dir_ + "/openssl.log");
  listen_ = "0.0.0.0:0";
  tls_ = true;
  ASSERT_TRUE(StartServer(
      WriteWorker("echo \"$MOMENTUM_COORDINATOR\" > " + dir_ + "/reports-to"),
      {"--tls-cert=" + dir_ + "/cert.pem", "--tls-key=" + dir_ + "/key.pem"}))
      << server_->log();
  const v1::Job job = client_->Submit(Spec());
  ASSERT_TRUE(client_->WaitForState(job.id(), v1::JOB_STATE_SUCCEEDED))
      << client_->Get(job.id()).state_reason();
  char hostname[256] = {};
  ::gethostname(hostname, sizeof(hostname) - 1);
  const std::string port = address_.substr(address_.rfind(':') + 1);
  EXPECT_EQ(ReadFile(dir_ + "/reports-to"),
            std::string(hostname) + ":" + port + "\n");
}

// Was: a rank inherited the server's whole environment, its secrets too.
TEST_F(ServerDefectsTest, RanksDoNotInheritTheServersSecrets) {
  ::setenv("MOMENTUM_TEST_SECRET", "hunter2", 1);
  ::setenv("AWS_SECRET_ACCESS_KEY", "also-secret", 1);
  ::setenv("OMP_NUM_THREADS", "3", 1);
  const bool started = StartServer(WriteWorker("env > " + dir_ + "/rank-env"));
  ::unsetenv("MOMENTUM_TEST_SECRET");
  ::unsetenv("AWS_SECRET_ACCESS_KEY");
  ::unsetenv("OMP_NUM_THREADS");
  ASSERT_TRUE(started);
  const v1::Job job = client_->Submit(Spec());
  ASSERT_TRUE(client_->WaitForState(job.id(), v1::JOB_STATE_SUCCEEDED));
  const std::string env = ReadFile(dir_ + "/rank-env");
  EXPECT_FALSE(absl::StrContains(env, "hunter2")) << env;
  EXPECT_FALSE(absl::StrContains(env, "also-secret")) << env;
  // What a rank needs is there: its place, its job, the basics and the
  // threading settings.
  for (const std::string& var : std::vector<std::string>{
           "\nRANK=0\n", "\nWORLD_SIZE=1\n", "MOMENTUM_JOB_ID=" + job.id(),
           "\nPATH=", "\nOMP_NUM_THREADS=3\n", "\nCUDA_VISIBLE_DEVICES=\n"}) {
    EXPECT_TRUE(absl::StrContains("\n" + env, var)) << var << "\n" << env;
  }
}

}  // namespace
}  // namespace momentum::server
