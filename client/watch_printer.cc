#include "client/watch_printer.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "client/format.h"
#include "common/job_progress.h"

namespace momentum::client {
namespace {

// Erases the current terminal line from the cursor to its end.
constexpr char kClearToEnd[] = "\x1b[K";

bool HasReport(const v1::Job& job) {
  return job.progress().step() != 0 || job.progress().epoch() != 0.0;
}

// Cuts a line to one column short of the terminal's width: some terminals
// wrap as soon as the last column is written, and a wrapped line cannot be
// redrawn with '\r'. The line is ASCII (names of states and numbers only).
std::string FitWidth(std::string text, int width) {
  if (width > 1 && static_cast<int>(text.size()) >= width) {
    text.resize(width - 1);
  }
  return text;
}

}  // namespace

WatchPrinter::WatchPrinter(std::ostream& out, WatchPrinterOptions options)
    : out_(out), options_(options) {}

bool WatchPrinter::Finished() const { return IsFinalState(job_.state()); }

void WatchPrinter::EndLine() {
  if (!options_.rewrite || drawn_.empty()) return;
  out_ << '\n';
  out_.flush();
  drawn_.clear();
}

void WatchPrinter::OnEvent(const v1::WatchJobEvent& event, absl::Time now) {
  switch (event.event_case()) {
    case v1::WatchJobEvent::kJob: {
      const bool first = !have_snapshot_;
      const v1::JobState before = job_.state();
      job_ = event.job();
      have_snapshot_ = true;
      // A final state is reported once, by PrintSummary.
      if (IsFinalState(job_.state())) return;
      if (first || job_.state() != before) {
        PrintStateLine(FormatStateLine(job_));
      }
      PrintProgress(now);
      return;
    }
    case v1::WatchJobEvent::kStateChange: {
      const v1::StateChange& change = event.state_change();
      job_.set_state(change.to());
      job_.set_state_reason(change.reason());
      if (change.to() != v1::JOB_STATE_PENDING) job_.set_queue_position(0);
      if (IsFinalState(change.to())) return;
      std::string line = absl::StrCat(EscapeForTerminal(job_.id()), " ",
                                      StateName(change.from()), " -> ",
                                      StateName(change.to()));
      std::string reason = EscapeForTerminal(OneLine(change.reason()));
      if (!reason.empty()) absl::StrAppend(&line, ": ", reason);
      PrintStateLine(line);
      // On a terminal the progress line comes back under the state line.
      if (options_.rewrite) PrintProgress(now);
      return;
    }
    case v1::WatchJobEvent::kMetric:
      ApplyMetric(event.metric());
      if (event.metric().rank() == 0 && !IsFinalState(job_.state())) {
        PrintProgress(now);
      }
      return;
    case v1::WatchJobEvent::kNotice: {
      std::string line =
          absl::StrCat(EscapeForTerminal(job_.id()), " ",
                       EscapeForTerminal(OneLine(event.notice().message())));
      PrintStateLine(line);
      if (options_.rewrite) PrintProgress(now);
      return;
    }
    case v1::WatchJobEvent::kLog:
    case v1::WatchJobEvent::EVENT_NOT_SET:
      return;
  }
}

void WatchPrinter::ApplyMetric(const v1::MetricSample& sample) {
  FoldSample(sample, job_.mutable_progress());
}

void WatchPrinter::PrintStateLine(const std::string& line) {
  if (options_.rewrite && !drawn_.empty()) {
    out_ << '\r' << kClearToEnd;
    drawn_.clear();
  }
  out_ << line << '\n';
  out_.flush();
}

void WatchPrinter::PrintProgress(absl::Time now) {
  std::string text = FormatProgressLine(job_);
  if (options_.rewrite) {
    text = FitWidth(std::move(text), options_.width);
    if (text == drawn_) return;
    out_ << '\r' << text << kClearToEnd;
    out_.flush();
    drawn_ = text;
    return;
  }
  if (!HasReport(job_)) return;
  if (last_progress_ && now - *last_progress_ < options_.progress_interval) {
    return;
  }
  out_ << text << '\n';
  out_.flush();
  last_progress_ = now;
}

void WatchPrinter::PrintSummary() {
  if (options_.rewrite && !drawn_.empty()) {
    // Leave the last numbers on screen, with the final state in front.
    out_ << '\r' << FitWidth(FormatProgressLine(job_), options_.width)
         << kClearToEnd << '\n';
    drawn_.clear();
  }
  out_ << FormatStateLine(job_) << '\n' << FormatSummary(job_);
  out_.flush();
}

}  // namespace momentum::client
