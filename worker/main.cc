// momentum-worker: trains one MoCo job.
//
//   momentum-worker --config job.yaml [--set optim.epochs=5 ...]
//       one process, or one rank of a group when RANK, WORLD_SIZE,
//       MASTER_ADDR and MASTER_PORT are set (as torchrun sets them) or
//       --rank/--world-size/--master-addr/--master-port are given;
//   momentum-worker --nproc N --config job.yaml
//       starts N local ranks itself (as torchrun --standalone), forwards
//       SIGINT/SIGTERM to them and, when one fails, stops the others and
//       exits non-zero naming the rank. resources.nproc > 1 in the spec does
//       the same.
// When the coordinator launches a rank it sets MOMENTUM_COORDINATOR
// (host:port), MOMENTUM_JOB_ID and MOMENTUM_ATTEMPT; the rank then streams
// heartbeats and its training series there (worker/reporter.h).
//
// Exit codes: 0 trained to the end, 1 failed, 2 bad flags or spec,
// 143 stopped by SIGTERM/SIGINT after writing a checkpoint.

#include <CLI/CLI.hpp>
#include <atomic>
#include <csignal>
#include <cstdlib>
#include <iostream>
#include <memory>

#include "common/exit_codes.h"
#include "common/job_spec.h"
#include "worker/launcher.h"
#include "worker/log.h"
#include "worker/malloc_tuning.h"
#include "worker/process_group.h"
#include "worker/reporter.h"
#include "worker/trainer.h"

namespace {

std::atomic<bool> g_stop{false};

void OnSignal(int) { g_stop.store(true); }

// This process's command line without --nproc N / --nproc=N: what each
// launched rank runs.
std::vector<std::string> RankCommand(int argc, char** argv) {
  std::vector<std::string> out = {"/proc/self/exe"};
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--nproc") {
      ++i;
      continue;
    }
    if (arg.rfind("--nproc=", 0) == 0) continue;
    out.push_back(arg);
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  namespace mw = momentum::worker;
  mw::TuneMallocForTraining();
  CLI::App app{"momentum-worker: trains a MoCo job"};
  std::string config;
  std::vector<std::string> overrides;
  bool print_spec = false;
  int64_t nproc = 0;
  int64_t rank = -1, world_size = -1, master_port = -1;
  std::string master_addr;
  app.add_option("--config,-c", config, "job spec (YAML)")->required();
  app.add_option("--set", overrides,
                 "override a spec field: dotted.key=value (repeatable)")
      ->take_all();
  app.add_flag("--print-spec", print_spec,
               "print the resolved spec with every default and exit");
  std::string output_dir;
  app.add_option("--output-dir", output_dir,
                 "where to write (replaces the spec's output_dir; the "
                 "coordinator passes the folder it resolved)");
  app.add_option("--nproc", nproc,
                 "start this many local ranks (default: resources.nproc)")
      ->check(CLI::PositiveNumber);
  app.add_option("--rank", rank, "this rank (default: $RANK)");
  app.add_option("--world-size", world_size,
                 "ranks in the group (default: $WORLD_SIZE)");
  app.add_option("--master-addr", master_addr,
                 "rank 0's store address (default: $MASTER_ADDR)");
  app.add_option("--master-port", master_port,
                 "rank 0's store port (default: $MASTER_PORT)");
  CLI11_PARSE(app, argc, argv);

  auto spec = momentum::LoadJobSpecFile(config, overrides);
  if (!spec.ok()) {
    std::cerr << "momentum-worker: " << spec.status().message() << "\n";
    return momentum::kExitBadInput;
  }
  if (!output_dir.empty()) spec->output_dir = output_dir;
  if (print_spec) {
    std::cout << momentum::JobSpecToYaml(*spec);
    return 0;
  }
  momentum::worker::SetupLog(/*quiet=*/false);

  // A rank of a group: flags first, then torchrun's variables.
  const bool in_group = rank >= 0 || std::getenv("RANK") != nullptr;
  if (!in_group && (nproc > 1 || (nproc == 0 && spec->resources.nproc > 1))) {
    mw::LaunchOptions launch;
    launch.argv = RankCommand(argc, argv);
    launch.nproc = nproc > 0 ? nproc : spec->resources.nproc;
    // This launcher owns the machine: it splits the CPUs among its ranks.
    launch.split_cpus = spec->resources.cpu_affinity == "auto";
    auto result = mw::LaunchLocal(launch);
    if (!result.ok()) {
      std::cerr << "momentum-worker: " << result.status().message() << "\n";
      return 1;
    }
    if (result->exit_code != 0 && !result->message.empty()) {
      std::cerr << "momentum-worker: " << result->message << "\n";
    }
    return result->exit_code;
  }

  mw::DistOptions dist;
  if (in_group) {
    if (rank < 0) {
      auto from_env = mw::DistOptionsFromEnv();
      if (!from_env.ok()) {
        std::cerr << "momentum-worker: " << from_env.status().message() << "\n";
        return momentum::kExitBadInput;
      }
      dist = *from_env;
    } else {
      dist.rank = rank;
      dist.world_size = world_size > 0 ? world_size : 1;
      if (!master_addr.empty()) dist.master_addr = master_addr;
      if (master_port >= 0) dist.master_port = master_port;
    }
    if (dist.rank >= dist.world_size) {
      std::cerr << "momentum-worker: --rank must be in [0, --world-size), got "
                << dist.rank << " of " << dist.world_size << "\n";
      return momentum::kExitBadInput;
    }
    if (dist.rank != 0) momentum::worker::SetupLog(/*quiet=*/true);
  }
  std::signal(SIGINT, OnSignal);
  std::signal(SIGTERM, OnSignal);

  // Started before the trainer, so that heartbeats flow while the group
  // forms and the data loads.
  auto reporter_options = mw::MetricsReporterOptionsFromEnv(dist.rank);
  if (!reporter_options.ok()) {
    std::cerr << "momentum-worker: " << reporter_options.status().message()
              << "\n";
    return momentum::kExitBadInput;
  }
  std::unique_ptr<mw::MetricsReporter> reporter;
  if (reporter_options->has_value()) {
    reporter = std::make_unique<mw::MetricsReporter>(**reporter_options);
  }

  auto trainer = mw::Trainer::Create(*spec, dist);
  if (!trainer.ok()) {
    std::cerr << "momentum-worker: rank " << dist.rank << ": "
              << trainer.status().message() << "\n";
    // A bad spec or data path fails every attempt alike: the coordinator
    // does not restart the job (common/exit_codes.h).
    const bool bad_input = absl::IsInvalidArgument(trainer.status()) ||
                           absl::IsNotFound(trainer.status());
    return bad_input ? momentum::kExitBadInput : momentum::kExitFailed;
  }
  if (reporter != nullptr) {
    (*trainer)->SetReportCallback(
        [r = reporter.get()](const mw::StepReport& report) {
          r->Report(report);
        });
  }
  auto summary = (*trainer)->Run(&g_stop);
  // The coordinator records the job's result from rank 0's account, so it
  // needs no access to this machine's disk.
  if (reporter != nullptr && summary.ok() && summary->stop_reason != "signal") {
    mw::RunAccount account;
    account.steps = summary->steps;
    account.images_seen = summary->images_seen;
    account.epochs_completed = static_cast<double>(summary->epochs_completed);
    account.knn_top1 = summary->knn_top1;
    account.export_path = summary->export_path;
    account.stop_reason = summary->stop_reason;
    account.train_seconds = summary->train_seconds;
    reporter->ReportFinal(account);
  }
  // Flushes the last reports (a few seconds at most) before the exit code
  // tells the coordinator the rank is done.
  if (reporter != nullptr) reporter->Close();
  if (!summary.ok()) {
    std::cerr << "momentum-worker: rank " << dist.rank << ": "
              << summary.status().message() << "\n";
    return momentum::kExitFailed;
  }
  if (summary->stop_reason == "signal") {
    momentum::worker::LogInfo("stopped at step %d; checkpoint %s",
                              summary->steps, summary->checkpoint);
    return momentum::kExitStopped;
  }
  if (dist.rank == 0) {
    std::printf(
        "done: %s reached after %lld steps, %lld images, %.1f s training, "
        "%.1f s wall\nkNN top-1: %.2f%%\nexported backbone: %s\n",
        summary->stop_reason.c_str(), static_cast<long long>(summary->steps),
        static_cast<long long>(summary->images_seen), summary->train_seconds,
        summary->wall_seconds, 100 * summary->knn_top1,
        summary->export_path.c_str());
  }
  return 0;
}
