// What the coordinator does with each message an agent or a rank sends on
// InternalService, apart from the gRPC streams that carry them: the
// dispatch of every AgentMessage and WorkerReport after the hello to the
// Coordinator (the hello's checks are CheckAgentHello, request_limits.h). The
// services (server/services.cc) read the streams and call these; the fuzz
// targets of tests/fuzz call them on arbitrary messages without a server.
//
//   if (absl::Status s = CheckAgentHello(hello); !s.ok()) return ToGrpc(s);
//   while (stream->Read(&message)) {
//     DispatchAgentMessage(message, *launcher, *coordinator);
//   }
#ifndef MOMENTUM_SERVER_INTERNAL_DISPATCH_H_
#define MOMENTUM_SERVER_INTERNAL_DISPATCH_H_

#include "absl/status/status.h"
#include "momentum/v1/internal.pb.h"
#include "server/agent_launcher.h"
#include "server/coordinator.h"

namespace momentum::server {

// One message of the agent behind `launcher` after its hello: output and
// exits of the ranks the agent runs go to the coordinator; what it says of
// other ranks is dropped with a line on stderr. Blocks only as long as the
// coordinator's handlers do.
void DispatchAgentMessage(const v1::AgentMessage& message,
                          AgentLauncher& launcher, Coordinator& coordinator);

// One report of the rank `hello` names, after its hello: metric samples
// (their rank set to the hello's), summaries and heartbeats go to the
// coordinator, which ignores those of ranks it does not run.
void DispatchWorkerReport(const v1::WorkerHello& hello,
                          const v1::WorkerReport& report,
                          Coordinator& coordinator);

}  // namespace momentum::server

#endif  // MOMENTUM_SERVER_INTERNAL_DISPATCH_H_
