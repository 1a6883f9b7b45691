// libFuzzer target: the coordinator's handling of what ranks report
// (InternalService.ReportMetrics). The input is a sequence of frames
// (tests/fuzz/frames.h), each a WorkerReport. "job-1" (two ranks) is
// submitted and launched on a fake launcher first. A hello opens a report
// stream (later frames are that rank's, as if several streams
// interleaved); every other report goes through DispatchWorkerReport, the
// service's own dispatch, for the stream open then, with a Tick() of the
// loop after each: metrics, heartbeats and summaries of live, past and
// unknown ranks, hangs, stragglers and restarts. Property: no crash, leak
// or sanitizer report.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "google/protobuf/stubs/logging.h"
#include "server/internal_dispatch.h"
#include "tests/fuzz/coordinator_harness.h"
#include "tests/fuzz/frames.h"

namespace v1 = ::momentum::v1;
namespace server = ::momentum::server;

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  google::protobuf::SetLogHandler(nullptr);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::vector<std::string> frames =
      momentum::fuzz::SplitFrames(data, size);
  momentum::fuzz::CoordinatorHarness harness;
  auto launcher = std::make_shared<server::testing::FakeLauncher>("local", 2);
  launcher->set_events(&harness.coordinator());
  launcher->set_exit_on_stop(true);
  harness.coordinator().AddLauncher(launcher);
  harness.SubmitJob();
  harness.Step(0);
  v1::WorkerHello hello;
  bool open = false;
  for (const std::string& frame : frames) {
    v1::WorkerReport report;
    if (!report.ParseFromString(frame)) continue;
    if (report.has_hello()) {
      hello = report.hello();
      open = true;
    } else if (open) {
      server::DispatchWorkerReport(hello, report, harness.coordinator());
    }
    harness.Step(1);
  }
  return 0;
}
