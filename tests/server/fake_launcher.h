// Fakes for the coordinator's unit tests: a Launcher that starts nothing and
// records what it is asked, and a Clock that moves only when told.
#ifndef MOMENTUM_TESTS_SERVER_FAKE_LAUNCHER_H_
#define MOMENTUM_TESTS_SERVER_FAKE_LAUNCHER_H_

#include <functional>
#include <mutex>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "common/exit_codes.h"
#include "server/clock.h"
#include "server/launcher.h"

namespace momentum::server::testing {

class FakeClock : public Clock {
 public:
  TimePoint Now() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return TimePoint() + std::chrono::hours(1) + offset_;
  }
  int64_t WallMs() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return 1'800'000'000'000 +
           std::chrono::duration_cast<std::chrono::milliseconds>(offset_)
               .count();
  }
  void Advance(double seconds) {
    std::lock_guard<std::mutex> lock(mu_);
    offset_ += Seconds(seconds);
  }

 private:
  mutable std::mutex mu_;
  std::chrono::steady_clock::duration offset_{};
};

// Thread-safe. Ranks "run" from Launch() until the test (or Stop(), with
// exit_on_stop) reports their exit through the LaunchEvents.
class FakeLauncher : public Launcher {
 public:
  struct StopCall {
    std::string job_id;
    int64_t attempt;
    double grace_seconds;
  };
  using Rank = std::tuple<std::string, int64_t, int64_t>;  // job, attempt, r

  FakeLauncher(std::string name, int64_t slots, std::vector<int> gpus = {})
      : name_(std::move(name)), slots_(slots), gpus_(std::move(gpus)) {}

  void set_events(LaunchEvents* events) { events_ = events; }
  // Launch() returns this error (nothing starts).
  void set_launch_error(absl::Status status) { launch_error_ = status; }
  // Launch() reports every rank as not started, from inside the call, the
  // way LocalLauncher does when it cannot spawn.
  void set_spawn_fails(bool fails) { spawn_fails_ = fails; }
  // Stop() reports the stopped ranks' exits (code 143) from inside the call.
  void set_exit_on_stop(bool exit) { exit_on_stop_ = exit; }
  // Called at the start of Launch(), outside any lock of the fake.
  void set_on_launch(std::function<void(const LaunchRequest&)> fn) {
    on_launch_ = std::move(fn);
  }

  std::string Name() const override { return name_; }
  std::string Address() const override { return "10.0.0.1"; }
  int64_t Slots() const override { return slots_; }
  std::vector<int> Gpus() const override { return gpus_; }

  absl::Status Launch(const LaunchRequest& request) override {
    if (on_launch_) on_launch_(request);
    {
      std::lock_guard<std::mutex> lock(mu_);
      calls_.push_back("launch " + request.job_id + " " +
                       std::to_string(request.attempt));
      if (!launch_error_.ok()) return launch_error_;
      launches_.push_back(request);
    }
    for (int64_t r : request.ranks) {
      if (spawn_fails_) {
        events_->OnRankExited(request.job_id, request.attempt, r, kExitBadInput,
                              0,
                              "could not be started: cannot start "
                              "/nonexistent: No such file or directory");
      } else {
        std::lock_guard<std::mutex> lock(mu_);
        running_.insert({request.job_id, request.attempt, r});
      }
    }
    return absl::OkStatus();
  }

  void Stop(const std::string& job_id, int64_t attempt,
            double grace_seconds) override {
    std::vector<int64_t> stopped;
    {
      std::lock_guard<std::mutex> lock(mu_);
      calls_.push_back("stop " + job_id + " " + std::to_string(attempt));
      stops_.push_back({job_id, attempt, grace_seconds});
      if (exit_on_stop_) {
        for (auto it = running_.begin(); it != running_.end();) {
          if (std::get<0>(*it) == job_id && std::get<1>(*it) == attempt) {
            stopped.push_back(std::get<2>(*it));
            it = running_.erase(it);
          } else {
            ++it;
          }
        }
      }
    }
    for (int64_t r : stopped) {
      events_->OnRankExited(job_id, attempt, r, kExitStopped, 0,
                            "exited with code 143");
    }
  }

  int StopLeftovers(const std::string& job_id, int64_t attempt,
                    double) override {
    std::lock_guard<std::mutex> lock(mu_);
    calls_.push_back("leftovers " + job_id + " " + std::to_string(attempt));
    return 0;
  }

  // The rank ends with `code`, as its process would.
  void Exit(const std::string& job_id, int64_t attempt, int64_t rank,
            int code) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      running_.erase({job_id, attempt, rank});
    }
    events_->OnRankExited(job_id, attempt, rank, code, 0,
                          "exited with code " + std::to_string(code));
  }
  // Every running rank of the job ends with `code`.
  void ExitAll(const std::string& job_id, int code) {
    std::vector<Rank> ranks;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (const Rank& r : running_) {
        if (std::get<0>(r) == job_id) ranks.push_back(r);
      }
    }
    for (const Rank& r : ranks)
      Exit(job_id, std::get<1>(r), std::get<2>(r), code);
  }

  std::vector<LaunchRequest> launches() const {
    std::lock_guard<std::mutex> lock(mu_);
    return launches_;
  }
  std::vector<StopCall> stops() const {
    std::lock_guard<std::mutex> lock(mu_);
    return stops_;
  }
  // "launch job-1 1", "stop job-1 1", "leftovers job-1 1", in order.
  std::vector<std::string> calls() const {
    std::lock_guard<std::mutex> lock(mu_);
    return calls_;
  }
  size_t running() const {
    std::lock_guard<std::mutex> lock(mu_);
    return running_.size();
  }

 private:
  const std::string name_;
  const int64_t slots_;
  const std::vector<int> gpus_;
  LaunchEvents* events_ = nullptr;
  absl::Status launch_error_;
  bool spawn_fails_ = false;
  bool exit_on_stop_ = false;
  std::function<void(const LaunchRequest&)> on_launch_;
  mutable std::mutex mu_;
  std::vector<LaunchRequest> launches_;
  std::vector<StopCall> stops_;
  std::vector<std::string> calls_;
  std::set<Rank> running_;
};

}  // namespace momentum::server::testing

#endif  // MOMENTUM_TESTS_SERVER_FAKE_LAUNCHER_H_
