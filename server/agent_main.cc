// momentum-agent: offers one machine's worker slots and GPUs to a
// coordinator and runs the ranks it is given there, as local processes (the
// same launcher the coordinator uses for its own slots). It connects to the
// coordinator (agents need no open port), says hello with its slots, its
// GPUs and the address other machines reach it at, then follows launch and
// stop commands and streams back its ranks' output and exits. When the
// coordinator goes away it stops its ranks and connects again, with back-off.
//
//   momentum-agent --server 10.0.0.1:50051 --slots 8 --gpus auto \
//       --advertise 10.0.0.2
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <iostream>
#include <thread>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/grpc_security.h"
#include "common/health_server.h"
#include "common/job_id.h"
#include "common/process.h"
#include "common/utf8.h"
#include "momentum/v1/internal.grpc.pb.h"
#include "server/gpus.h"
#include "server/launcher.h"
#include "server/local_launcher.h"

namespace {

namespace fs = std::filesystem;
namespace v1 = momentum::v1;
using momentum::server::LaunchRequest;
using momentum::server::LocalLauncher;

std::atomic<bool> g_stop{false};

std::string Hostname() {
  char buf[256] = {};
  ::gethostname(buf, sizeof(buf) - 1);
  return buf;
}

// Writes to the session's stream from the launcher's threads and the
// heartbeat thread, one at a time.
class Session : public momentum::server::LaunchEvents {
 public:
  explicit Session(
      grpc::ClientReaderWriter<v1::AgentMessage, v1::AgentCommand>* stream)
      : stream_(stream) {}

  bool Write(const v1::AgentMessage& message) {
    absl::MutexLock lock(&mu_);
    return stream_->Write(message);
  }
  void OnRankOutput(const std::string& job_id, int64_t attempt, int64_t rank,
                    const std::string& line) override {
    v1::AgentMessage m;
    v1::RankOutput* out = m.mutable_output();
    out->set_job_id(job_id);
    out->set_attempt(static_cast<int32_t>(attempt));
    out->set_rank(static_cast<int32_t>(rank));
    // A proto string: bytes that are not UTF-8 would fail the session.
    out->add_lines(momentum::ToValidUtf8(line));
    Write(m);
  }
  void OnRankExited(const std::string& job_id, int64_t attempt, int64_t rank,
                    int exit_code, int signal,
                    const std::string& description) override {
    v1::AgentMessage m;
    v1::RankExited* e = m.mutable_exited();
    e->set_job_id(job_id);
    e->set_attempt(static_cast<int32_t>(attempt));
    e->set_rank(static_cast<int32_t>(rank));
    e->set_exit_code(exit_code);
    e->set_signal(signal);
    e->set_tail(description);
    Write(m);
  }

 private:
  // Serialises writes (gRPC allows one at a time); held for nothing else.
  absl::Mutex mu_;
  grpc::ClientReaderWriter<v1::AgentMessage, v1::AgentCommand>* stream_
      ABSL_PT_GUARDED_BY(mu_);
};

// One session with the coordinator; returns when it ends.
void RunSession(v1::InternalService::Stub& stub, const v1::AgentHello& hello,
                const std::string& worker, const std::string& work_dir,
                const std::string& token, double grace,
                momentum::HealthServer* health) {
  grpc::ClientContext context;
  momentum::AddToken(&context, token);
  auto stream = stub.AgentSession(&context);
  Session session(stream.get());
  v1::AgentMessage first;
  *first.mutable_hello() = hello;
  if (!session.Write(first)) return;
  v1::AgentCommand command;
  if (!stream->Read(&command) || command.welcome_agent_id().empty()) {
    std::cerr << "momentum-agent: the coordinator did not welcome us: "
              << stream->Finish().error_message() << "\n";
    return;
  }
  const std::vector<int> gpus(hello.gpus().begin(), hello.gpus().end());
  std::cerr << "momentum-agent: registered as " << command.welcome_agent_id()
            << " with " << hello.slots() << " slots and GPUs "
            << momentum::server::GpuList(gpus) << "\n";
  // Probes see the agent ready while a coordinator can give it ranks.
  if (health != nullptr) health->SetServing(true);
  {
    LocalLauncher launcher(worker, hello.slots(), gpus, work_dir, &session);
    std::atomic<bool> done{false};
    std::thread heartbeat([&] {
      while (!done && !g_stop) {
        std::this_thread::sleep_for(std::chrono::seconds(2));
        v1::AgentMessage beat;
        const auto now = std::chrono::system_clock::now().time_since_epoch();
        beat.mutable_heartbeat()->set_seconds(
            std::chrono::duration_cast<std::chrono::seconds>(now).count());
        if (!done && !session.Write(beat)) break;
      }
    });
    std::thread watcher([&] {
      while (!done) {
        if (g_stop) context.TryCancel();
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
    });
    while (stream->Read(&command)) {
      if (command.has_launch()) {
        const v1::LaunchRank& l = command.launch();
        // The id names the rank's folder under --work-dir.
        if (!momentum::IsJobId(l.job_id())) {
          std::cerr << "momentum-agent: a launch of \""
                    << absl::CHexEscape(l.job_id().substr(0, 64))
                    << "\", which is not a job id; dropped\n";
          continue;
        }
        LaunchRequest request;
        request.job_id = l.job_id();
        request.attempt = l.attempt();
        request.world_size = l.world_size();
        request.ranks = {l.rank()};
        if (l.has_gpu()) request.gpus = {l.gpu()};
        request.spec_yaml = l.spec_yaml();
        request.output_dir = l.output_dir();
        request.master_addr = l.master_addr();
        request.master_port = l.master_port();
        request.env.assign(l.env().begin(), l.env().end());
        request.env.push_back(absl::StrCat("LOCAL_RANK=", l.local_rank()));
        request.env.push_back(
            absl::StrCat("LOCAL_WORLD_SIZE=", l.local_world_size()));
        // Peers on other machines reach this rank at the agent's address.
        request.env.push_back("MOMENTUM_LOCAL_ADDR=" +
                              hello.advertise_address());
        absl::Status s = launcher.Launch(request);
        if (!s.ok()) {
          session.OnRankExited(l.job_id(), l.attempt(), l.rank(), 1, 0,
                               std::string(s.message()));
        }
      } else if (command.has_stop()) {
        launcher.Stop(command.stop().job_id(), command.stop().attempt(),
                      command.stop().grace_seconds());
      }
    }
    done = true;
    heartbeat.join();
    watcher.join();
    // Without a coordinator nobody would supervise the ranks: stop them the
    // way a coordinator does, so that they checkpoint where they are and the
    // next coordinator resumes them from there.
    if (!launcher.RunningPids().empty()) {
      std::cerr << "momentum-agent: stopping " << launcher.RunningPids().size()
                << " rank(s) (SIGTERM, SIGKILL after " << grace << " s)\n";
      launcher.StopAll(grace);
    }
  }
  if (health != nullptr) health->SetServing(false);
  grpc::Status status = stream->Finish();
  if (!g_stop) {
    std::cerr << "momentum-agent: session ended: "
              << (status.ok() ? "closed by the coordinator"
                              : status.error_message())
              << "\n";
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"momentum-agent: runs a coordinator's ranks on this machine"};
  std::string server, advertise = "127.0.0.1", name, work_dir;
  std::string worker = momentum::FindSiblingBinary("momentum-worker", "worker");
  int64_t slots = std::max(1u, std::thread::hardware_concurrency());
  app.add_option("--server", server, "the coordinator (host:port)")->required();
  app.add_option("--slots", slots, "CPU ranks this machine runs at once")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  std::string gpus_flag = "auto";
  app.add_option("--gpus", gpus_flag, momentum::server::kGpusFlagHelp)
      ->capture_default_str();
  app.add_option("--advertise", advertise,
                 "address other machines reach this one at (for the c10d "
                 "store when rank 0 runs here)")
      ->capture_default_str();
  app.add_option("--name", name, "this agent's id (default: assigned)");
  app.add_option("--work-dir", work_dir,
                 "where ranks run (default: /tmp/momentum-agent-<pid>)");
  app.add_option("--worker", worker, "the momentum-worker binary")
      ->capture_default_str();
  momentum::TlsFiles tls;
  std::string token_file;
  app.add_option("--tls-ca", tls.ca,
                 "CA of the coordinator's certificate: use TLS (default: "
                 "$MOMENTUM_TLS_CA)");
  app.add_option("--tls-cert", tls.cert,
                 "this agent's certificate for mutual TLS (default: "
                 "$MOMENTUM_TLS_CERT)");
  app.add_option("--tls-key", tls.key,
                 "its private key (default: $MOMENTUM_TLS_KEY)");
  app.add_option("--token-file", token_file,
                 "file with this agent's bearer token (default: "
                 "$MOMENTUM_TOKEN, else the file $MOMENTUM_TOKEN_FILE)");
  double grace = 10;
  app.add_option("--grace-seconds", grace,
                 "time a rank has between SIGTERM and SIGKILL when its "
                 "coordinator goes away")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  std::string health_listen;
  app.add_option("--health-listen", health_listen,
                 "plaintext address that answers only grpc.health.v1.Health "
                 "(SERVING while a coordinator session is up), for "
                 "Kubernetes probes (default: none)");
  CLI11_PARSE(app, argc, argv);
  const auto gpus = momentum::server::ParseGpusFlag(gpus_flag);
  if (!gpus.ok()) {
    std::cerr << "momentum-agent: " << gpus.status().message() << "\n";
    return 2;
  }
  auto credentials =
      momentum::ClientCredentials(momentum::ClientTlsFromEnv(tls));
  if (!credentials.ok()) {
    std::cerr << "momentum-agent: " << credentials.status().message() << "\n";
    return 2;
  }
  auto token = momentum::ClientToken(token_file);
  if (!token.ok()) {
    std::cerr << "momentum-agent: " << token.status().message() << "\n";
    return 2;
  }
  if (worker.find('/') != std::string::npos) {
    worker = fs::absolute(worker).lexically_normal().string();
  }
  if (work_dir.empty()) {
    work_dir = (fs::temp_directory_path() /
                absl::StrCat("momentum-agent-", ::getpid()))
                   .string();
  }
  work_dir = fs::absolute(work_dir).lexically_normal().string();
  std::error_code ec;
  fs::create_directories(work_dir, ec);
  if (ec) {
    std::cerr << "momentum-agent: cannot create --work-dir " << work_dir << ": "
              << ec.message() << "\n";
    return 1;
  }
  struct sigaction action = {};
  action.sa_handler = [](int) { g_stop = true; };
  sigaction(SIGINT, &action, nullptr);
  sigaction(SIGTERM, &action, nullptr);
  signal(SIGPIPE, SIG_IGN);

  std::unique_ptr<momentum::HealthServer> health;
  if (!health_listen.empty()) {
    auto started = momentum::HealthServer::Start(health_listen);
    if (!started.ok()) {
      std::cerr << "momentum-agent: --health-listen: "
                << started.status().message() << "\n";
      return 1;
    }
    health = *std::move(started);
  }

  v1::AgentHello hello;
  hello.set_hostname(Hostname());
  hello.set_advertise_address(advertise);
  hello.set_slots(static_cast<int32_t>(slots));
  hello.set_agent_id(name);
  for (int gpu : *gpus) hello.add_gpus(gpu);
  auto channel = grpc::CreateChannel(server, *credentials);
  auto stub = v1::InternalService::NewStub(channel);
  auto backoff = std::chrono::milliseconds(200);
  while (!g_stop) {
    const auto started = std::chrono::steady_clock::now();
    RunSession(*stub, hello, worker, work_dir, *token, grace, health.get());
    if (g_stop) break;
    if (std::chrono::steady_clock::now() - started > std::chrono::seconds(10)) {
      backoff = std::chrono::milliseconds(200);
    }
    for (auto waited = std::chrono::milliseconds(0);
         waited < backoff && !g_stop;
         waited += std::chrono::milliseconds(100)) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    backoff = std::min(backoff * 2, std::chrono::milliseconds(5000));
  }
  return 0;
}
