// momentum-worker: trains one MoCo job in this process.
//
//   momentum-worker --config job.yaml [--set optim.epochs=5 ...]
//
// Exit codes: 0 trained to the end, 1 failed, 2 bad flags or spec,
// 143 stopped by SIGTERM/SIGINT after writing a checkpoint.
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <csignal>
#include <iostream>

#include "common/job_spec.h"
#include "worker/malloc_tuning.h"
#include "worker/trainer.h"

namespace {

std::atomic<bool> g_stop{false};

void OnSignal(int) { g_stop.store(true); }

}  // namespace

int main(int argc, char** argv) {
  momentum::worker::TuneMallocForTraining();
  CLI::App app{"momentum-worker: trains a MoCo job"};
  std::string config;
  std::vector<std::string> overrides;
  bool print_spec = false;
  app.add_option("--config,-c", config, "job spec (YAML)")->required();
  app.add_option("--set", overrides,
                 "override a spec field: dotted.key=value (repeatable)")
      ->take_all();
  app.add_flag("--print-spec", print_spec,
               "print the resolved spec with every default and exit");
  CLI11_PARSE(app, argc, argv);

  auto spec = momentum::LoadJobSpecFile(config, overrides);
  if (!spec.ok()) {
    std::cerr << "momentum-worker: " << spec.status().message() << "\n";
    return 2;
  }
  if (print_spec) {
    std::cout << momentum::JobSpecToYaml(*spec);
    return 0;
  }
  std::signal(SIGINT, OnSignal);
  std::signal(SIGTERM, OnSignal);

  spdlog::set_pattern("[%H:%M:%S] %v");
  spdlog::flush_on(
      spdlog::level::info);  // progress reaches pipes and logs at once
  auto trainer = momentum::worker::Trainer::Create(*spec);
  if (!trainer.ok()) {
    std::cerr << "momentum-worker: " << trainer.status().message() << "\n";
    return trainer.status().code() == absl::StatusCode::kInvalidArgument ? 2
                                                                         : 1;
  }
  auto summary = (*trainer)->Run(&g_stop);
  if (!summary.ok()) {
    std::cerr << "momentum-worker: " << summary.status().message() << "\n";
    return 1;
  }
  if (summary->stop_reason == "signal") {
    spdlog::info("stopped at step {}; checkpoint {}", summary->steps,
                 summary->checkpoint);
    return 143;
  }
  std::printf(
      "done: %s reached after %lld steps, %lld images, %.1f s training, %.1f s "
      "wall\nkNN top-1: %.2f%%\nexported backbone: %s\n",
      summary->stop_reason.c_str(), static_cast<long long>(summary->steps),
      static_cast<long long>(summary->images_seen), summary->train_seconds,
      summary->wall_seconds, 100 * summary->knn_top1,
      summary->export_path.c_str());
  return 0;
}
