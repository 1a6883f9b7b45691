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

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <tuple>
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
                                     "--gpus=none",
                                     "--ready-file=" + ready};
    // One slot unless the test asks for more.
    if (std::none_of(flags.begin(), flags.end(), [](const std::string& f) {
          return absl::StartsWith(f, "--slots=");
        })) {
      args.push_back("--slots=1");
    }
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
  // The job may still be starting on a loaded machine: it must reach RUNNING
  // before the release, and SUCCEEDED after it.
  void ReleaseAndExpectSuccess(const std::string& id) {
    EXPECT_TRUE(client_->WaitForState(id, v1::JOB_STATE_RUNNING))
        << v1::JobState_Name(client_->Get(id).state());
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
  ASSERT_TRUE(client_->WaitForState(job.id(), v1::JOB_STATE_RUNNING));

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
  // The 8 MB come as ceil(8000000 / 16384) = 489 pieces of at most
  // 16 KiB. The rank's log rate (1 MiB/s, bursts of 5 s) keeps the first
  // 5 MiB = 320 pieces, and more only as the bucket refills; the rest is
  // dropped and counted in notices: kept and dropped pieces add up.
  grpc::ClientContext logs_ctx;
  v1::GetJobLogsRequest logs;
  logs.set_job_id(job.id());
  auto reader = client_->stub().GetJobLogs(&logs_ctx, logs);
  v1::LogLine line;
  int64_t bytes = 0, pieces = 0, dropped = 0, notices = 0;
  while (reader->Read(&line)) {
    EXPECT_LE(line.text().size(), 16384u);
    if (line.text().rfind("momentum-server: dropped ", 0) == 0) {
      ++notices;
      dropped += std::stoll(line.text().substr(25));
      continue;
    }
    bytes += static_cast<int64_t>(line.text().size());
    ++pieces;
  }
  EXPECT_TRUE(reader->Finish().ok());
  EXPECT_GE(notices, 1);
  EXPECT_EQ(pieces + dropped, 489);
  EXPECT_GE(bytes, 5 * 1024 * 1024);
  EXPECT_LT(bytes, 8000000);
}

// Issue 16: every request is bounded, the refusal names the field, the
// limit and the value, and nothing is stored. Limits set small by flags.
TEST_F(ServerDefectsTest, OversizedRequestsAreRefusedAndNothingIsStored) {
  ASSERT_TRUE(StartServer(WriteWorker("exit 0"),
                          {"--max-spec-bytes=300", "--max-overrides=1",
                           "--max-override-bytes=24", "--max-page-size=5"}))
      << server_->log();
  auto submit = [&](const std::string& spec,
                    const std::vector<std::string>& overrides) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + seconds(10));
    v1::SubmitJobRequest request;
    request.set_spec_yaml(spec);
    for (const std::string& o : overrides) request.add_overrides(o);
    v1::SubmitJobResponse response;
    return client_->stub().SubmitJob(&ctx, request, &response);
  };
  auto expect_refused = [](const grpc::Status& status,
                           const std::string& message) {
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_TRUE(absl::StrContains(status.error_message(), message))
        << status.error_message();
  };
  // 8 + 27 + 24 + 35 = 94 bytes (Spec() without its output_dir); a comment
  // of 207 makes 301.
  const std::string spec =
      "name: t\ndata: {path: /nonexistent}\n"
      "optim: {batch_size: 12}\nresources: {nproc: 1, device: cpu}\n";
  ASSERT_EQ(spec.size(), 94u);
  expect_refused(submit(spec + "#" + std::string(205, 'x') + "\n", {}),
                 "spec_yaml must have at most 300 bytes, got 301");
  expect_refused(submit(spec, {"optim.epochs=1", "optim.steps=1"}),
                 "overrides must have at most 1 entries, got 2");
  expect_refused(submit(spec, {"name=" + std::string(20, 'n')}),
                 "overrides[0] must have at most 24 bytes, got 25");
  // Ranks: more than the 1 slot of a server without agents, and more than
  // --max-ranks-per-job (default 1024).
  expect_refused(
      submit("name: t\ndata: {path: /d}\noptim: {batch_size: 12}\n"
             "resources: {nproc: 2, device: cpu}\n",
             {}),
      "resources.nproc 2 asks for 2 CPU slots, but this server has 1 "
      "(--slots) and no agent is connected");
  expect_refused(submit("name: t\ndata: {path: /d}\noptim: {batch_size: 1025}\n"
                        "resources: {nproc: 1025, device: cpu}\n",
                        {}),
                 "resources.nproc must be <= 1024 on this server, got 1025");
  // Names: too long, and characters that are not allowed.
  expect_refused(submit("name: " + std::string(129, 'n') + "\n", {}),
                 "name must have at most 128 characters, got 129");
  expect_refused(submit("name: \"a\\e[2J\"\n", {}),
                 "name must match [A-Za-z0-9._-]+, got \"a\\x1b[2J\"");
  EXPECT_EQ(client_->StoredJobs(), 0);

  // A page past --max-page-size, and a cancel reason past 1024 bytes.
  grpc::ClientContext list_ctx;
  v1::ListJobsRequest list;
  list.set_page_size(6);
  v1::ListJobsResponse listed;
  expect_refused(client_->stub().ListJobs(&list_ctx, list, &listed),
                 "page_size must be in [0, 5], got 6");
  const v1::Job job = client_->Submit(Spec());
  ASSERT_TRUE(client_->WaitForState(job.id(), v1::JOB_STATE_SUCCEEDED));
  grpc::ClientContext cancel_ctx;
  v1::CancelJobRequest cancel;
  cancel.set_job_id(job.id());
  cancel.set_reason(std::string(1025, 'r'));
  v1::CancelJobResponse cancelled;
  expect_refused(client_->stub().CancelJob(&cancel_ctx, cancel, &cancelled),
                 "reason must have at most 1024 bytes, got 1025");
  EXPECT_EQ(client_->StoredJobs(), 1);
}

// Was: a rank that printed a byte that is not UTF-8 (a Latin-1 é) made
// its log line an invalid proto string, and `momentum logs` hung. Now the
// byte is stored as U+FFFD, and the client prints the line with its escape
// sequence made visible (issue 16, point 5).
TEST_F(ServerDefectsTest, RankBytesAreStoredAsUtf8AndPrintedEscaped) {
  ASSERT_TRUE(
      StartServer(WriteWorker("printf 'caf\\351 \\033[2Jgone\\n'; echo after")))
      << server_->log();
  const v1::Job job = client_->Submit(Spec());
  ASSERT_TRUE(client_->WaitForState(job.id(), v1::JOB_STATE_SUCCEEDED));
  Process cli({BinaryDir() + "/client/momentum", "--server=" + address_,
               "--timeout=30", "logs", job.id()},
              dir_ + "/cli.log");
  EXPECT_EQ(cli.WaitForExit(), 0);
  EXPECT_EQ(ReadFile(dir_ + "/cli.log"),
            "caf\xef\xbf\xbd \\x1b[2Jgone\nafter\n");
}

// Issue 16: a rank that floods its output is cut to the log rate (here 10
// lines/s in bursts of 1 s), with notices saying how many lines were
// dropped; the stored log is bounded and accounts for every line.
TEST_F(ServerDefectsTest, FloodingRankIsCutToTheLogRateWithNotices) {
  ASSERT_TRUE(
      StartServer(WriteWorker("i=0; while [ $i -lt 1000 ]; do i=$((i+1)); "
                              "echo \"line $i\"; done"),
                  {"--log-lines-per-second=10", "--log-burst-seconds=1"}))
      << server_->log();
  const auto start = std::chrono::steady_clock::now();
  const v1::Job job = client_->Submit(Spec());
  ASSERT_TRUE(client_->WaitForState(job.id(), v1::JOB_STATE_SUCCEEDED))
      << server_->log();
  const double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
          .count();
  grpc::ClientContext ctx;
  v1::GetJobLogsRequest logs;
  logs.set_job_id(job.id());
  auto reader = client_->stub().GetJobLogs(&ctx, logs);
  v1::LogLine line;
  int64_t kept = 0, dropped = 0, notices = 0;
  std::string first_notice;
  while (reader->Read(&line)) {
    if (line.text().rfind("momentum-server: dropped ", 0) == 0) {
      if (notices++ == 0) first_notice = line.text();
      dropped += std::stoll(line.text().substr(25));
    } else {
      ++kept;
    }
  }
  ASSERT_TRUE(reader->Finish().ok());
  // The first burst of 10 lines, then at most 10 a second; one notice per
  // refill to half the bucket (5 lines), and one at the rank's end.
  EXPECT_EQ(kept + dropped, 1000);
  EXPECT_GE(kept, 10);
  EXPECT_LE(kept, 10 + 10 * elapsed + 1) << elapsed;
  EXPECT_GE(notices, 1);
  EXPECT_LE(notices, 1 + kept / 5 + 1);
  EXPECT_TRUE(absl::StrContains(first_notice,
                                " of rank 0: over the log rate limit (10 "
                                "lines/s, 1048576 bytes/s, bursts of 1 s)"))
      << first_notice;
}

// Issue 16: watch and log streams are limited per user as well as in all;
// without tokens every caller is anonymous and shares one count.
TEST_F(ServerDefectsTest, WatchStreamsArePerUserToo) {
  ASSERT_TRUE(
      StartServer(WaitingWorker("true"), {"--max-watch-streams-per-user=1"}))
      << server_->log();
  const v1::Job job = client_->Submit(Spec());
  v1::GetJobLogsRequest request;
  request.set_job_id(job.id());
  request.set_follow(true);
  grpc::ClientContext first_ctx, second_ctx;
  auto first = client_->stub().GetJobLogs(&first_ctx, request);
  v1::WatchJobRequest watch;
  watch.set_job_id(job.id());
  // The first stream is open once the server answers another call after
  // it; the second is refused.
  ASSERT_TRUE(Eventually([&] {
    grpc::ClientContext ctx;
    auto again = client_->stub().WatchJob(&ctx, watch);
    v1::WatchJobEvent event;
    const bool ok = again->Read(&event);
    // Taken (the first stream was not open yet): this one stays open until
    // it is cancelled.
    if (ok) ctx.TryCancel();
    const grpc::Status status = again->Finish();
    return !ok && status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED &&
           absl::StrContains(status.error_message(),
                             "anonymous callers already have 1 watch and log "
                             "streams open, the limit per user "
                             "(--max-watch-streams-per-user)");
  })) << server_->log();
  first_ctx.TryCancel();
  first->Finish();
  ReleaseAndExpectSuccess(job.id());
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

// One report stream to the internal service with `token`: the hello, then
// one sample at `step` with a kNN accuracy of step / 100 (which the job's
// progress takes from any rank). Returns how the server ended the stream.
grpc::Status Report(const std::shared_ptr<grpc::Channel>& channel,
                    const std::string& token, const std::string& job_id,
                    int32_t attempt, int32_t rank, int64_t step) {
  auto internal = v1::InternalService::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + seconds(10));
  if (!token.empty()) ctx.AddMetadata("authorization", "Bearer " + token);
  v1::WorkerReportAck ack;
  auto stream = internal->ReportMetrics(&ctx, &ack);
  v1::WorkerReport hello;
  hello.mutable_hello()->set_job_id(job_id);
  hello.mutable_hello()->set_attempt(attempt);
  hello.mutable_hello()->set_rank(rank);
  v1::WorkerReport sample;
  sample.mutable_metric()->set_step(step);
  sample.mutable_metric()->set_epoch(0.5);
  sample.mutable_metric()->set_knn_top1(static_cast<double>(step) / 100);
  if (stream->Write(hello)) stream->Write(sample);
  stream->WritesDone();
  return stream->Finish();
}

// Was: every rank of every job reported with one worker token, so a rank
// (or anyone who read its environment) could send metrics for another job
// under any rank number. Now each launch gives each rank a credential of
// its own, good for its job, attempt and rank, and revoked when the gang
// ends; a user's token may not report at all.
TEST_F(ServerDefectsTest, RankCredentialReportsForItsOwnRankOnly) {
  const std::string alice = "alice-token-0123456789abcdef";
  std::ofstream(dir_ + "/tokens") << alice << " alice user\n";
  const std::string worker =
      WaitingWorker("printf %s \"$MOMENTUM_TOKEN\" > " + dir_ +
                    "/token-$MOMENTUM_JOB_ID-$RANK.tmp && mv " + dir_ +
                    "/token-$MOMENTUM_JOB_ID-$RANK.tmp " + dir_ +
                    "/token-$MOMENTUM_JOB_ID-$RANK");
  ASSERT_TRUE(
      StartServer(worker, {"--slots=3", "--token-file=" + dir_ + "/tokens"}));
  client_->set_token(alice);
  const v1::Job two = client_->Submit(
      "name: t\ndata: {path: /nonexistent}\noptim: {batch_size: 12}\n"
      "resources: {nproc: 2, device: cpu}\n");
  const v1::Job one = client_->Submit(Spec());
  ASSERT_FALSE(two.id().empty());
  ASSERT_FALSE(one.id().empty());
  const auto token_of = [&](const std::string& id, int rank) {
    const std::string path = absl::StrCat(dir_, "/token-", id, "-", rank);
    EXPECT_TRUE(Eventually([&] { return fs::exists(path); })) << path;
    return ReadFile(path);
  };
  const std::string t0 = token_of(two.id(), 0), t1 = token_of(two.id(), 1),
                    other = token_of(one.id(), 0);
  EXPECT_NE(t0, t1);
  EXPECT_NE(t0, other);
  EXPECT_FALSE(absl::StrContains(t0, alice));

  // Its own job, attempt and rank: taken (the job's progress shows it).
  const auto knn_of = [&](const std::string& id) {
    return client_->Get(id).progress().knn_top1();
  };
  EXPECT_TRUE(Report(client_->channel(), t1, two.id(), 1, 1, 7).ok());
  EXPECT_TRUE(Eventually([&] { return knn_of(two.id()) == 0.07; }));
  // Another rank of its job, another job, another attempt: refused.
  for (const auto& [job, attempt, rank] :
       std::vector<std::tuple<std::string, int, int>>{
           {two.id(), 1, 0}, {one.id(), 1, 0}, {two.id(), 2, 1}}) {
    const grpc::Status refused =
        Report(client_->channel(), t1, job, attempt, rank, 99);
    EXPECT_EQ(refused.error_code(), grpc::StatusCode::PERMISSION_DENIED)
        << job << " " << attempt << " " << rank << ": "
        << refused.error_message();
    EXPECT_TRUE(
        absl::StrContains(refused.error_message(),
                          "this credential is for rank 1 of " + two.id()))
        << refused.error_message();
  }
  EXPECT_EQ(knn_of(one.id()), -1);
  EXPECT_EQ(knn_of(two.id()), 0.07);
  // No credential, a made-up one, a user's token: refused.
  EXPECT_EQ(Report(client_->channel(), "", one.id(), 1, 0, 99).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(Report(client_->channel(),
                   "rank.0123456789abcdef." + std::string(64, '0'), one.id(), 1,
                   0, 99)
                .error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(Report(client_->channel(), alice, one.id(), 1, 0, 99).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  // A rank's credential is nothing on the job API.
  {
    TestJobClient as_rank(address_);
    as_rank.set_token(t1);
    grpc::ClientContext ctx;
    as_rank.Prepare(&ctx);
    v1::ListJobsResponse listed;
    EXPECT_EQ(as_rank.stub()
                  .ListJobs(&ctx, v1::ListJobsRequest(), &listed)
                  .error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
  }
  EXPECT_EQ(knn_of(one.id()), -1);

  // The gang ends: its credentials are revoked.
  ReleaseAndExpectSuccess(two.id());
  EXPECT_EQ(Report(client_->channel(), t1, two.id(), 1, 1, 8).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_TRUE(client_->WaitForState(one.id(), v1::JOB_STATE_SUCCEEDED));
}

// Was: an agent named itself (AgentHello.agent_id): any agent token could
// take another agent's name. Now the name is the one the agent proved (its
// token's name), qualified by what it asks for, one session per name.
TEST_F(ServerDefectsTest, AgentsGoByTheNameTheyProved) {
  const std::string node1 = "node1-token-0123456789abcdef";
  const std::string node2 = "node2-token-0123456789abcdef";
  std::ofstream(dir_ + "/tokens") << node1 << " node-1 agent\n"
                                  << node2 << " node-2 agent\n";
  ASSERT_TRUE(
      StartServer(WriteWorker("exit 0"), {"--token-file=" + dir_ + "/tokens"}));
  auto internal = v1::InternalService::NewStub(client_->channel());
  struct Session {
    grpc::ClientContext ctx;
    std::unique_ptr<
        grpc::ClientReaderWriter<v1::AgentMessage, v1::AgentCommand>>
        stream;
  };
  // Opens a session as `token` asking for `asked`; the welcome's name, or
  // the status the server ended it with.
  std::vector<std::unique_ptr<Session>> open;
  const auto join = [&](const std::string& token, const std::string& asked) {
    auto session = std::make_unique<Session>();
    session->ctx.AddMetadata("authorization", "Bearer " + token);
    session->stream = internal->AgentSession(&session->ctx);
    v1::AgentMessage hello;
    hello.mutable_hello()->set_hostname("h");
    hello.mutable_hello()->set_advertise_address("127.0.0.1");
    hello.mutable_hello()->set_slots(1);
    hello.mutable_hello()->set_agent_id(asked);
    session->stream->Write(hello);
    v1::AgentCommand welcome;
    std::string got;
    if (session->stream->Read(&welcome)) {
      got = welcome.welcome_agent_id();
    } else {
      const grpc::Status status = session->stream->Finish();
      got = absl::StrCat("refused ", status.error_code(), ": ",
                         status.error_message());
    }
    open.push_back(std::move(session));
    return got;
  };
  EXPECT_EQ(join(node1, ""), "node-1");
  // node-1 cannot take node-2's name: it gets it under its own.
  EXPECT_EQ(join(node1, "node-2"), "node-1/node-2");
  EXPECT_EQ(join(node2, "node-2"), "node-2");
  // One session per name.
  EXPECT_TRUE(absl::StartsWith(
      join(node1, "node-2"),
      absl::StrCat("refused ", grpc::StatusCode::ALREADY_EXISTS)));
  // A second agent on node-1's token without a name of its own: numbered.
  EXPECT_TRUE(absl::StartsWith(join(node1, ""), "node-1/"));
  EXPECT_TRUE(absl::StartsWith(
      join(node1, "../x"),
      absl::StrCat("refused ", grpc::StatusCode::INVALID_ARGUMENT)));
  for (auto& session : open) session->ctx.TryCancel();
}

}  // namespace
}  // namespace momentum::server
