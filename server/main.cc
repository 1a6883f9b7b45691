// momentum-server: the coordinator. With no flags it listens on
// 127.0.0.1:50051, keeps its store under ~/.local/state/momentum (or
// $XDG_STATE_HOME/momentum), serves /metrics on 127.0.0.1:9464 and runs
// ranks as local processes on as many slots as the machine has cores, and
// the ranks of CUDA jobs on its NVIDIA GPUs, one each (--gpus).
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <signal.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/grpc_security.h"
#include "common/health_server.h"
#include "common/process.h"
#include "server/coordinator.h"
#include "server/gpus.h"
#include "server/local_launcher.h"
#include "server/report_address.h"
#include "server/server_metrics.h"
#include "server/services.h"

namespace {

namespace fs = std::filesystem;

std::string DefaultStateDir() {
  if (const char* xdg = std::getenv("XDG_STATE_HOME"); xdg && *xdg) {
    return (fs::path(xdg) / "momentum").string();
  }
  if (const char* home = std::getenv("HOME"); home && *home) {
    return (fs::path(home) / ".local" / "state" / "momentum").string();
  }
  return "momentum-state";
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"momentum-server: stores, schedules and supervises MoCo jobs"};
  std::string listen = "127.0.0.1:50051";
  std::string metrics_listen = "127.0.0.1:9464";
  std::string state_dir = DefaultStateDir();
  std::string worker = momentum::FindSiblingBinary("momentum-worker", "worker");
  std::string ready_file;
  int64_t slots = std::max(1u, std::thread::hardware_concurrency());
  double grace = 10;
  int64_t retention = 300;
  app.add_option("--listen", listen,
                 "gRPC address (host:port; port 0: the OS picks one)")
      ->capture_default_str();
  app.add_option("--metrics-listen", metrics_listen,
                 "address of the Prometheus /metrics endpoint")
      ->capture_default_str();
  app.add_option("--state-dir", state_dir,
                 "where the job store, logs and job outputs live")
      ->capture_default_str();
  app.add_option("--slots", slots,
                 "CPU ranks this machine runs at once (0 with --gpus none: "
                 "only agents run ranks)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  std::string gpus_flag = "auto";
  app.add_option("--gpus", gpus_flag, momentum::server::kGpusFlagHelp)
      ->capture_default_str();
  app.add_option("--worker", worker, "the momentum-worker binary")
      ->capture_default_str();
  app.add_option("--grace-seconds", grace,
                 "time a stopped rank has between SIGTERM and SIGKILL")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  app.add_option("--metrics-retention-seconds", retention,
                 "how long a finished job's training series stay on /metrics")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  momentum::TlsFiles tls;
  std::string token_file;
  std::vector<std::string> data_roots, user_output_roots;
  std::string output_root;
  // Far past what one server runs, yet a typo in resources.nproc (or a
  // hostile spec) cannot queue a job that needs a thousand machines.
  int64_t max_ranks = 1024;
  int64_t max_message_bytes = 16 << 20;
  app.add_option("--tls-cert", tls.cert,
                 "server certificate (PEM); with --tls-key enables TLS");
  app.add_option("--tls-key", tls.key, "the certificate's private key (PEM)");
  app.add_option("--tls-client-ca", tls.ca,
                 "CA of client certificates: require them (mutual TLS)");
  app.add_option("--token-file", token_file,
                 "accepted bearer tokens, \"TOKEN NAME ROLE\" per line (role: "
                 "user, viewer, admin or agent); without it no token is "
                 "asked for");
  app.add_option("--data-root", data_roots,
                 "data.path of a job must lie under one of these "
                 "(repeatable; default: anywhere)");
  app.add_option("--output-root", output_root,
                 "each submitter's outputs live in a folder of its own here, "
                 "DIR/NAME (NAME: the token's or certificate's name, "
                 "_anonymous without): a relative output_dir within it, an "
                 "absolute one under it or a --user-output-root of the "
                 "submitter's (admins: anywhere under DIR or any "
                 "--user-output-root); default: STATE_DIR/outputs");
  app.add_option("--user-output-root", user_output_roots,
                 "USER=DIR: USER may also write an absolute output_dir under "
                 "DIR (repeatable)");
  app.add_option("--max-ranks-per-job", max_ranks,
                 "most ranks one job may ask for (0: only the spec's own "
                 "limit, 65536)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  int64_t max_queued = 0;
  app.add_option("--max-queued-jobs-per-user", max_queued,
                 "most PENDING jobs one user (token name, else TLS client "
                 "certificate name) may have (0: no limit)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  app.add_option("--max-message-bytes", max_message_bytes,
                 "largest gRPC message accepted")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  std::string advertise;
  app.add_option("--advertise-address", advertise,
                 "host (or host:port) ranks reach this server at to report "
                 "metrics (default: the --listen host; for 0.0.0.0 or [::], "
                 "this machine's hostname)");
  int64_t max_watch_streams = 512;
  app.add_option("--max-watch-streams", max_watch_streams,
                 "most open watch and log streams (each holds a thread)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  int64_t max_watch_streams_per_user = 128;
  app.add_option("--max-watch-streams-per-user", max_watch_streams_per_user,
                 "most open watch and log streams of one user (token name, "
                 "else TLS client certificate name; anonymous callers share "
                 "one count)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  momentum::server::RequestLimits limits;
  app.add_option("--max-spec-bytes", limits.max_spec_bytes,
                 "largest job spec (YAML text) accepted")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--max-overrides", limits.max_overrides,
                 "most overrides (key=value) one submission may carry")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  app.add_option("--max-override-bytes", limits.max_override_bytes,
                 "longest override accepted")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--max-page-size", limits.max_page_size,
                 "most jobs in one ListJobs page")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  momentum::server::LogRateLimiter::Options log_rate;
  app.add_option("--log-lines-per-second", log_rate.lines_per_second,
                 "lines per second each rank may log; the excess is dropped "
                 "with a notice of how many (0: no limit)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  int64_t log_bytes_per_second = 1 << 20;
  app.add_option("--log-bytes-per-second", log_bytes_per_second,
                 "bytes per second each rank may log (0: no limit)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  app.add_option("--log-burst-seconds", log_rate.burst_seconds,
                 "a rank may log this many seconds' worth of the two rates "
                 "at once")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  std::string health_listen;
  app.add_option("--health-listen", health_listen,
                 "plaintext address that answers only grpc.health.v1.Health, "
                 "for Kubernetes probes (default: none)");
  app.add_option("--ready-file", ready_file,
                 "once serving, write the bound gRPC and /metrics addresses "
                 "here as JSON");
  CLI11_PARSE(app, argc, argv);
  const auto gpus = momentum::server::ParseGpusFlag(gpus_flag);
  if (!gpus.ok()) {
    std::cerr << "momentum-server: " << gpus.status().message() << "\n";
    return 2;
  }
  // Ranks run in folders of their own: every path they are given is
  // absolute.
  state_dir = fs::absolute(state_dir).lexically_normal().string();
  if (worker.find('/') != std::string::npos) {
    worker = fs::absolute(worker).lexically_normal().string();
  }

  // Shutdown on SIGINT/SIGTERM, handled on a thread of its own.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  signal(SIGPIPE, SIG_IGN);

  // Without TLS nothing leaves this machine.
  const bool tls_on = !tls.cert.empty();
  const std::string host = momentum::server::HostOf(listen);
  const bool loopback = host.rfind("127.", 0) == 0 || host == "localhost" ||
                        host == "[::1]" || host == "::1";
  if (!tls_on && !loopback) {
    std::cerr << "momentum-server: --listen " << listen
              << ": without TLS (--tls-cert, --tls-key) the server listens on "
                 "loopback only\n";
    return 2;
  }
  auto credentials = momentum::ServerCredentials(tls);
  if (!credentials.ok()) {
    std::cerr << "momentum-server: " << credentials.status().message() << "\n";
    return 2;
  }
  momentum::TokenTable tokens;
  if (!token_file.empty()) {
    auto loaded = momentum::TokenTable::Load(token_file);
    if (!loaded.ok()) {
      std::cerr << "momentum-server: " << loaded.status().message() << "\n";
      return 2;
    }
    tokens = *std::move(loaded);
  }
  // Ranks report with credentials of their own, one per rank and launch,
  // which the coordinator issues (server/rank_credentials.h).

  auto metrics = momentum::server::ServerMetrics::Create(
      metrics_listen, std::chrono::seconds(retention));
  if (!metrics.ok()) {
    std::cerr << "momentum-server: " << metrics.status().message() << "\n";
    return 1;
  }
  momentum::server::CoordinatorOptions options;
  options.state_dir = state_dir;
  options.grace_seconds = grace;
  options.admission.data_roots = data_roots;
  options.admission.output_root = output_root;
  for (const std::string& entry : user_output_roots) {
    const size_t eq = entry.find('=');
    if (eq == 0 || eq == std::string::npos || eq + 1 == entry.size() ||
        entry[eq + 1] != '/') {
      std::cerr << "momentum-server: --user-output-root must be USER=DIR "
                   "with an absolute DIR, got \""
                << entry << "\"\n";
      return 2;
    }
    options.admission.user_output_roots.emplace_back(entry.substr(0, eq),
                                                     entry.substr(eq + 1));
  }
  options.admission.max_ranks_per_job = max_ranks;
  options.max_queued_jobs_per_user = max_queued;
  options.max_watch_streams = static_cast<size_t>(max_watch_streams);
  options.max_watch_streams_per_user =
      static_cast<size_t>(max_watch_streams_per_user);
  options.limits = limits;
  log_rate.bytes_per_second = static_cast<double>(log_bytes_per_second);
  options.log_rate = log_rate;
  auto coordinator =
      momentum::server::Coordinator::Create(options, metrics->get());
  if (!coordinator.ok()) {
    std::cerr << "momentum-server: " << coordinator.status().message() << "\n";
    return 1;
  }
  // Ranks of its own machine: the local launcher, unless it has neither
  // slots nor GPUs (agents only).
  if (slots > 0 || !gpus->empty()) {
    (*coordinator)
        ->AddLauncher(std::make_shared<momentum::server::LocalLauncher>(
            worker, slots, *gpus, (fs::path(state_dir) / "jobs").string(),
            coordinator->get()));
  }

  momentum::server::JobServiceImpl jobs(coordinator->get(), metrics->get(),
                                        &tokens);
  momentum::server::InternalServiceImpl internal(coordinator->get(),
                                                 metrics->get(), &tokens);
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(listen, *credentials, &port);
  builder.SetMaxReceiveMessageSize(static_cast<int>(max_message_bytes));
  builder.RegisterService(&jobs);
  builder.RegisterService(&internal);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    std::cerr << "momentum-server: cannot listen on " << listen << "\n";
    return 1;
  }
  const std::string address =
      absl::StrCat(momentum::server::HostOf(listen), ":", port);
  char hostname[256] = {};
  ::gethostname(hostname, sizeof(hostname) - 1);
  (*coordinator)
      ->SetReportAddress(momentum::server::ReportAddress(
          momentum::server::HostOf(listen), port, advertise, hostname));
  (*coordinator)->Start();
  std::unique_ptr<momentum::HealthServer> health;
  if (!health_listen.empty()) {
    auto started = momentum::HealthServer::Start(health_listen);
    if (!started.ok()) {
      std::cerr << "momentum-server: --health-listen: "
                << started.status().message() << "\n";
      (*coordinator)->Shutdown();
      return 1;
    }
    health = *std::move(started);
    health->SetServing(true);
  }
  const std::string metrics_address = absl::StrCat(
      momentum::server::HostOf(metrics_listen), ":", (*metrics)->port());
  std::cerr << "momentum-server: serving on " << address << ", /metrics on "
            << metrics_address << ", state in " << state_dir << ", " << slots
            << " local slots, local GPUs " << momentum::server::GpuList(*gpus)
            << (tls_on ? (tls.ca.empty() ? ", TLS" : ", mutual TLS")
                       : ", no TLS (loopback only)")
            << (tokens.empty() ? ", no tokens" : ", bearer tokens") << "\n";
  if (!ready_file.empty()) {
    const std::string tmp = ready_file + ".tmp";
    std::ofstream(tmp) << "{\"grpc\": \"" << address << "\", \"metrics\": \""
                       << metrics_address << "\", \"pid\": " << getpid()
                       << (health ? absl::StrCat(
                                        ", \"health\": \"",
                                        momentum::server::HostOf(health_listen),
                                        ":", health->port(), "\"")
                                  : "")
                       << "}\n";
    fs::rename(tmp, ready_file);
  }

  int sig = 0;
  sigwait(&stop_signals, &sig);
  std::cerr << "momentum-server: " << (sig == SIGINT ? "SIGINT" : "SIGTERM")
            << ": stopping\n";
  if (health) health->SetServing(false);
  (*coordinator)->Shutdown();
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  return 0;
}
