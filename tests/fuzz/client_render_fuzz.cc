// libFuzzer target: what the client prints of what a server sends. The
// input is a sequence of frames (tests/fuzz/frames.h): the first a v1::Job,
// rendered by every formatter of `momentum list`, `get`, `submit` and
// `--json`; the rest WatchJobEvents through a WatchPrinter (in pipe mode
// and in terminal mode, cut to a width) to the final summary, and LogLines
// as `momentum logs --json` prints them. Frames that do not parse are
// skipped. Properties beyond "no crash, leak or sanitizer report": the live
// progress line is printable ASCII, as FitWidth's byte cut assumes; and
// nothing a server or rank sent reaches the terminal as a control
// character (C0 but newline and tab, DEL, C1): everything printed for
// people, the pipe-mode watch included, is escaped.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "client/format.h"
#include "client/watch_printer.h"
#include "google/protobuf/stubs/logging.h"
#include "momentum/v1/jobs.pb.h"
#include "tests/fuzz/frames.h"

namespace v1 = ::momentum::v1;
namespace client = ::momentum::client;

namespace {

void CheckPrintable(const std::string& text) {
  for (unsigned char c : text) {
    if (c < 0x20 || c > 0x7e) std::abort();
  }
}

// Aborts on a control character: C0 other than '\n' and '\t', DEL, or a
// C1 control (U+0080..U+009F, 0xC2 0x80..0x9F in UTF-8).
void CheckNoControls(const std::string& text) {
  for (size_t i = 0; i < text.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(text[i]);
    if ((c < 0x20 && c != '\n' && c != '\t') || c == 0x7f) std::abort();
    if (c == 0xc2 && i + 1 < text.size()) {
      const unsigned char d = static_cast<unsigned char>(text[i + 1]);
      if (d >= 0x80 && d <= 0x9f) std::abort();
    }
  }
}

}  // namespace

// Invalid UTF-8 in a string field is a refusal, not news: keep protobuf's
// log quiet.
extern "C" int LLVMFuzzerInitialize(int*, char***) {
  google::protobuf::SetLogHandler(nullptr);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::vector<std::string> frames =
      momentum::fuzz::SplitFrames(data, size);
  if (frames.empty()) return 0;
  const absl::Time now = absl::FromUnixSeconds(1'800'000'000);
  v1::Job job;
  if (job.ParseFromString(frames[0])) {
    std::vector<std::vector<std::string>> rows = {client::JobRow(job, now)};
    CheckNoControls(client::RenderTable(client::JobTableHeader(), rows));
    CheckNoControls(client::RenderKeyValues(client::JobFields(job), "  "));
    CheckNoControls(client::FormatSubmitted(job));
    CheckNoControls(client::FormatStateLine(job));
    CheckNoControls(client::FormatSummary(job));
    CheckNoControls(client::FormatWallTime(job));
    CheckNoControls(client::FormatAgeOrDuration(job, now));
    CheckPrintable(client::FormatProgressLine(job));
    client::OneLine(client::ToJson(job));
  }
  std::ostringstream pipe_out, tty_out;
  client::WatchPrinter pipe(pipe_out, {});
  client::WatchPrinterOptions tty_options;
  tty_options.rewrite = true;
  tty_options.width = 40;
  client::WatchPrinter tty(tty_out, tty_options);
  absl::Time at = now;
  for (size_t i = 1; i < frames.size(); ++i) {
    v1::WatchJobEvent event;
    if (event.ParseFromString(frames[i])) {
      at += absl::Seconds(3);
      pipe.OnEvent(event, at);
      tty.OnEvent(event, at);
      CheckPrintable(client::FormatProgressLine(tty.job()));
    }
    v1::LogLine line;
    if (line.ParseFromString(frames[i])) client::ToJson(line);
  }
  tty.EndLine();
  if (pipe.Finished()) pipe.PrintSummary();
  if (tty.Finished()) tty.PrintSummary();
  CheckNoControls(pipe_out.str());
  return 0;
}
