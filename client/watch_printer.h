// Turns the WatchJob event stream into the text `momentum watch` prints in
// table mode: state lines, a progress line and the final summary.
//
// Usage:
//   WatchPrinterOptions options;
//   options.rewrite = isatty(STDOUT_FILENO) != 0;
//   WatchPrinter printer(std::cout, options);
//   v1::WatchJobEvent event;
//   while (reader->Read(&event)) printer.OnEvent(event, absl::Now());
//   if (printer.Finished()) printer.PrintSummary();
//
// On a terminal (`rewrite`) the progress line is redrawn in place with '\r'
// after every update; state lines are printed above it. Otherwise (a pipe, a
// log file, a test) it prints a line per state change and at most one
// progress line per `progress_interval` of updates, always the first.
//
// Not thread-safe: one thread reads the stream and calls it.
#ifndef MOMENTUM_CLIENT_WATCH_PRINTER_H_
#define MOMENTUM_CLIENT_WATCH_PRINTER_H_

#include <optional>
#include <ostream>
#include <string>

#include "absl/time/time.h"
#include "momentum/v1/jobs.pb.h"

namespace momentum::client {

struct WatchPrinterOptions {
  // Redraw one progress line with '\r' (stdout is a terminal).
  bool rewrite = false;
  // Without `rewrite`: the least time between two progress lines.
  absl::Duration progress_interval = absl::Seconds(5);
  // With `rewrite`: cut the progress line to this many columns, so that it
  // never wraps (a wrapped line cannot be redrawn with '\r'); 0: no limit.
  int width = 0;
};

class WatchPrinter {
 public:
  WatchPrinter(std::ostream& out, WatchPrinterOptions options);

  // Applies one event (a job snapshot, a state change or a metric sample;
  // log lines are ignored) and prints what it changes. `now` is when it
  // arrived; it only paces the progress lines.
  void OnEvent(const ::momentum::v1::WatchJobEvent& event, absl::Time now);

  // True once the job is in a final state (SUCCEEDED, FAILED, CANCELLED).
  bool Finished() const;

  // With `rewrite`: ends the progress line drawn in place, if any, so that
  // what is printed next (an error on stderr) starts on a line of its own.
  void EndLine();

  // Ends the progress line and prints the final state line and the summary
  // (steps, kNN top-1, export path, wall time). Call once, after the stream
  // ended.
  void PrintSummary();

  // The job as the events so far describe it: the last snapshot with later
  // state changes and rank 0's metric samples applied.
  const ::momentum::v1::Job& job() const { return job_; }

 private:
  void PrintStateLine(const std::string& line);
  void PrintProgress(absl::Time now);
  void ApplyMetric(const ::momentum::v1::MetricSample& sample);

  std::ostream& out_;
  const WatchPrinterOptions options_;
  ::momentum::v1::Job job_;
  bool have_snapshot_ = false;
  // With `rewrite`: the progress line drawn now, without a newline; empty
  // when the cursor is at the start of a fresh line.
  std::string drawn_;
  // Without `rewrite`: when the last progress line was printed.
  std::optional<absl::Time> last_progress_;
};

}  // namespace momentum::client

#endif  // MOMENTUM_CLIENT_WATCH_PRINTER_H_
