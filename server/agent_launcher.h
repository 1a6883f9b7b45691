// The coordinator's side of a node agent: a Launcher whose ranks run on the
// agent's machine. Launch and stop commands go into a queue that the agent's
// session (InternalService.AgentSession) writes to the agent's stream.
#ifndef MOMENTUM_SERVER_AGENT_LAUNCHER_H_
#define MOMENTUM_SERVER_AGENT_LAUNCHER_H_

#include <chrono>
#include <deque>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "momentum/v1/internal.pb.h"
#include "server/launcher.h"

namespace momentum::server {

// Thread-safe; owns no thread. Launch() and Stop() only queue commands,
// which the session's writer thread takes with NextCommand(); the session's
// reader asks Runs()/Ended() before it believes what the agent says of a
// rank. One mutex, a leaf; nothing is called under it.
class AgentLauncher : public Launcher {
 public:
  // `slots` and `gpus` as the agent offered them (AgentHello).
  AgentLauncher(std::string agent_id, std::string hostname, std::string address,
                int64_t slots, std::vector<int> gpus)
      : agent_id_(std::move(agent_id)),
        hostname_(std::move(hostname)),
        address_(std::move(address)),
        slots_(slots),
        gpus_(std::move(gpus)) {}

  std::string Name() const override {
    return "agent " + agent_id_ + " (" + hostname_ + ")";
  }
  std::string Address() const override { return address_; }
  int64_t Slots() const override;
  std::vector<int> Gpus() const override;
  absl::Status Launch(const LaunchRequest& request) override;
  void Stop(const std::string& job_id, int64_t attempt,
            double grace_seconds) override;

  // Whether this agent was told to run the rank and has not reported it
  // ended: what an agent reports of other ranks is not believed.
  bool Runs(const std::string& job_id, int64_t attempt, int64_t rank) const;
  // The rank ended: true (and it is forgotten) when Runs() was true.
  bool Ended(const std::string& job_id, int64_t attempt, int64_t rank);

  // The next command for the agent; false after `wait` with none, or when
  // closed.
  bool NextCommand(v1::AgentCommand* command, std::chrono::milliseconds wait);
  // The agent is gone: no slots, no GPUs, no more commands.
  void Close();
  bool closed() const;

 private:
  void Push(v1::AgentCommand command);

  const std::string agent_id_, hostname_, address_;
  const int64_t slots_;
  const std::vector<int> gpus_;
  mutable absl::Mutex mu_;
  absl::CondVar cv_;
  std::deque<v1::AgentCommand> commands_ ABSL_GUARDED_BY(mu_);
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  std::set<std::tuple<std::string, int64_t, int64_t>> ranks_
      ABSL_GUARDED_BY(mu_);
};

}  // namespace momentum::server

#endif  // MOMENTUM_SERVER_AGENT_LAUNCHER_H_
