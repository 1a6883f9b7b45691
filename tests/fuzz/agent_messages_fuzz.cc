// libFuzzer target: the coordinator's handling of what a node agent sends
// on its session (InternalService.AgentSession). The input is a sequence
// of frames (tests/fuzz/frames.h), each an AgentMessage: the first must be
// a hello that CheckAgentHello accepts, as the service requires; then the
// agent is added, "job-1" (two ranks) is submitted and launched on it, and
// every further message goes through DispatchAgentMessage, the service's
// own dispatch, with a Tick() of the loop after each. At the end the agent
// leaves, as when its stream closes. Property: no crash, leak, sanitizer
// report or hang.
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "google/protobuf/stubs/logging.h"
#include "server/agent_launcher.h"
#include "server/internal_dispatch.h"
#include "server/request_limits.h"
#include "tests/fuzz/coordinator_harness.h"
#include "tests/fuzz/frames.h"

namespace v1 = ::momentum::v1;
namespace server = ::momentum::server;

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  google::protobuf::SetLogHandler(nullptr);
  // The dispatch reports dropped messages on stderr; thousands per second
  // would drown libFuzzer's own output.
  std::cerr.setstate(std::ios::failbit);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::vector<std::string> frames =
      momentum::fuzz::SplitFrames(data, size);
  if (frames.empty()) return 0;
  v1::AgentMessage message;
  if (!message.ParseFromString(frames[0]) || !message.has_hello() ||
      !server::CheckAgentHello(message.hello()).ok()) {
    return 0;
  }
  const v1::AgentHello& hello = message.hello();
  momentum::fuzz::CoordinatorHarness harness;
  auto launcher = std::make_shared<server::AgentLauncher>(
      hello.agent_id().empty() ? "agent-1" : hello.agent_id(), hello.hostname(),
      hello.advertise_address(), hello.slots(),
      std::vector<int>(hello.gpus().begin(), hello.gpus().end()));
  harness.coordinator().AddLauncher(launcher);
  harness.SubmitJob();
  harness.Step(0);
  v1::AgentCommand command;
  for (size_t i = 1; i < frames.size(); ++i) {
    if (!message.ParseFromString(frames[i])) continue;
    server::DispatchAgentMessage(message, *launcher, harness.coordinator());
    harness.Step(0.5);
    // The session's writer thread takes the commands.
    while (launcher->NextCommand(&command, std::chrono::milliseconds(0))) {
    }
  }
  launcher->Close();
  harness.coordinator().RemoveLauncher(launcher.get());
  harness.Step(0);
  return 0;
}
