// What the coordinator's fuzz targets (agent_messages, worker_reports)
// share: a real Coordinator on a fresh state directory (a real SQLite
// JobStore) with a fake clock, a watcher of everything, and one CPU job of
// two ranks submitted, so that the fuzzed messages meet a live gang:
// "job-1", attempt 1, ranks 0 and 1 once Tick() launched it.
#ifndef MOMENTUM_TESTS_FUZZ_COORDINATOR_HARNESS_H_
#define MOMENTUM_TESTS_FUZZ_COORDINATOR_HARNESS_H_

#include <stdlib.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>

#include "server/coordinator.h"
#include "tests/server/fake_launcher.h"

namespace momentum::fuzz {

class CoordinatorHarness {
 public:
  static constexpr char kSpec[] =
      "name: fuzz\ndata: {path: /data}\noptim: {batch_size: 32}\n"
      "resources: {nproc: 2, device: cpu}\n"
      "scheduling: {max_restarts: 2, restart_backoff_s: 1}\n";

  // A coordinator on a state directory emptied first; aborts when it cannot
  // be made (that is no finding about the input).
  CoordinatorHarness() {
    std::filesystem::remove_all(StateDir());
    server::CoordinatorOptions options;
    options.state_dir = StateDir();
    options.grace_seconds = 0.01;
    options.clock = &clock_;
    auto created = server::Coordinator::Create(options);
    if (!created.ok()) std::abort();
    coordinator_ = *std::move(created);
  }

  server::Coordinator& coordinator() { return *coordinator_; }
  server::testing::FakeClock& clock() { return clock_; }

  // Submits kSpec and subscribes to its events; call after the launchers
  // were added.
  void SubmitJob() {
    auto job = coordinator_->Submit(kSpec, {}, "fuzz");
    if (!job.ok()) std::abort();
    auto watch = coordinator_->Watch(job->id(), true, true);
    if (watch.ok()) watch_ = *watch;
  }

  // Time passes, the loop runs once, the watcher reads what it got.
  void Step(double seconds) {
    clock_.Advance(seconds);
    coordinator_->Tick();
    v1::WatchJobEvent event;
    while (watch_ && watch_->Next(&event, std::chrono::milliseconds(0))) {
    }
  }

  ~CoordinatorHarness() {
    if (watch_) coordinator_->Unwatch(watch_);
    coordinator_.reset();
  }

 private:
  // One folder per process, removed when it exits; in memory where there
  // is a tmpfs, as the store syncs every commit.
  static const std::string& StateDir() {
    static const std::string* dir = [] {
      std::string pattern =
          std::filesystem::is_directory("/dev/shm") ? "/dev/shm" : "/tmp";
      pattern += "/coordinator_fuzz.XXXXXX";
      if (::mkdtemp(pattern.data()) == nullptr) std::abort();
      std::atexit([] {
        std::filesystem::remove_all(
            std::filesystem::path(StateDir()).parent_path());
      });
      return new std::string(std::string(pattern) + "/state");
    }();
    return *dir;
  }

  server::testing::FakeClock clock_;
  std::unique_ptr<server::Coordinator> coordinator_;
  std::shared_ptr<server::Subscription> watch_;
};

}  // namespace momentum::fuzz

#endif  // MOMENTUM_TESTS_FUZZ_COORDINATOR_HARNESS_H_
