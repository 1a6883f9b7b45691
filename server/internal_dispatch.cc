#include "server/internal_dispatch.h"

#include <iostream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "server/gpus.h"

namespace momentum::server {

void DispatchAgentMessage(const v1::AgentMessage& message,
                          AgentLauncher& launcher, Coordinator& coordinator) {
  if (message.has_output()) {
    const v1::RankOutput& out = message.output();
    if (!launcher.Runs(out.job_id(), out.attempt(), out.rank())) {
      std::cerr << "momentum-server: " << launcher.Name()
                << " sent output of a rank it does not run (job \""
                << out.job_id().substr(0, 64) << "\" attempt " << out.attempt()
                << " rank " << out.rank() << "); dropped\n";
      return;
    }
    for (const std::string& line : out.lines()) {
      coordinator.OnRankOutput(out.job_id(), out.attempt(), out.rank(), line);
    }
  } else if (message.has_exited()) {
    const v1::RankExited& e = message.exited();
    if (!launcher.Ended(e.job_id(), e.attempt(), e.rank())) {
      std::cerr << "momentum-server: " << launcher.Name()
                << " reported the end of a rank it does not run (job \""
                << e.job_id().substr(0, 64) << "\" attempt " << e.attempt()
                << " rank " << e.rank() << "); ignored\n";
      return;
    }
    std::string description =
        e.signal() != 0 ? absl::StrCat("was killed by signal ", e.signal())
                        : absl::StrCat("exited with code ", e.exit_code());
    absl::StrAppend(&description, " on ", launcher.Name());
    coordinator.OnRankExited(e.job_id(), e.attempt(), e.rank(), e.exit_code(),
                             e.signal(), description);
  }
}

void DispatchWorkerReport(const v1::WorkerHello& hello,
                          const v1::WorkerReport& report,
                          Coordinator& coordinator) {
  if (report.has_metric()) {
    v1::MetricSample sample = report.metric();
    sample.set_rank(hello.rank());
    coordinator.OnMetric(hello.job_id(), hello.attempt(), sample);
  } else if (report.has_summary()) {
    coordinator.OnSummary(hello.job_id(), hello.attempt(), hello.rank(),
                          report.summary());
  } else if (report.has_heartbeat()) {
    coordinator.OnHeartbeat(hello.job_id(), hello.attempt(), hello.rank());
  }
}

}  // namespace momentum::server
