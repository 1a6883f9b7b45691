#include "client/commands.h"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <set>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "client/format.h"
#include "client/watch_printer.h"
#include "common/file_util.h"

namespace momentum::client {
namespace {

// Prints the one-line error of a failed call and returns kExitFailure.
int ReportError(const CommandContext& context, absl::string_view method,
                const absl::Status& status) {
  context.err << "momentum: " << method << ": "
              << absl::StatusCodeToString(status.code()) << ": "
              << EscapeForTerminal(OneLine(status.message())) << "\n";
  context.err.flush();
  return kExitFailure;
}

void PrintJson(const CommandContext& context,
               const google::protobuf::Message& message) {
  context.out << ToJson(message) << "\n";
  context.out.flush();
}

}  // namespace

int RunSubmit(const CommandContext& context, const SubmitOptions& options) {
  absl::StatusOr<std::string> spec = ReadWholeFile(options.file);
  if (!spec.ok()) {
    context.err << "momentum: " << spec.status().message() << "\n";
    return kExitFailure;
  }
  v1::SubmitJobRequest request;
  request.set_spec_yaml(*std::move(spec));
  for (const std::string& override : options.overrides) {
    request.add_overrides(override);
  }
  absl::StatusOr<v1::Job> job = context.client.SubmitJob(request);
  if (!job.ok()) return ReportError(context, "SubmitJob", job.status());
  if (context.output == OutputFormat::kJson) {
    PrintJson(context, *job);
  } else {
    context.out << FormatSubmitted(*job) << "\n";
    context.out.flush();
  }
  if (!options.wait) return kExitOk;
  return RunWatch(context, job->id());
}

int RunList(const CommandContext& context, const ListOptions& options) {
  v1::ListJobsRequest request;
  for (v1::JobState state : options.states) request.add_states(state);
  request.set_name_contains(options.name_contains);
  request.set_page_size(options.limit);

  v1::ListJobsResponse all;
  std::set<std::string> tokens_seen;
  while (true) {
    absl::StatusOr<v1::ListJobsResponse> page =
        context.client.ListJobs(request);
    if (!page.ok()) return ReportError(context, "ListJobs", page.status());
    for (v1::Job& job : *page->mutable_jobs()) {
      *all.add_jobs() = std::move(job);
    }
    all.set_next_page_token(page->next_page_token());
    all.set_total_size(page->total_size());
    if (!options.all_pages || page->next_page_token().empty()) break;
    // A server that hands out the same token twice would loop forever.
    if (!tokens_seen.insert(page->next_page_token()).second) {
      return ReportError(
          context, "ListJobs",
          absl::InternalError(absl::StrCat("the server repeated page token \"",
                                           page->next_page_token(), "\"")));
    }
    request.set_page_token(page->next_page_token());
  }

  if (context.output == OutputFormat::kJson) {
    PrintJson(context, all);
    return kExitOk;
  }
  if (all.jobs().empty()) {
    context.out << "no jobs\n";
    return kExitOk;
  }
  const absl::Time now = context.now();
  std::vector<std::vector<std::string>> rows;
  for (const v1::Job& job : all.jobs()) rows.push_back(JobRow(job, now));
  context.out << RenderTable(JobTableHeader(), rows);
  context.out.flush();
  if (!all.next_page_token().empty()) {
    // On stderr, so that a pipe (`momentum list | grep`) sees only the table.
    context.err << "showing " << all.jobs_size() << " of " << all.total_size()
                << " jobs; --all-pages lists them all\n";
  }
  return kExitOk;
}

int RunGet(const CommandContext& context, const GetOptions& options) {
  absl::StatusOr<v1::Job> job = context.client.GetJob(options.job_id);
  if (!job.ok()) return ReportError(context, "GetJob", job.status());
  if (context.output == OutputFormat::kJson) {
    PrintJson(context, *job);
    return kExitOk;
  }
  context.out << RenderKeyValues(JobFields(*job));
  if (options.spec) {
    context.out << "spec_yaml:\n";
    for (absl::string_view line : absl::StrSplit(job->spec_yaml(), '\n')) {
      if (line.empty()) continue;
      context.out << "  " << EscapeForTerminal(line) << "\n";
    }
  }
  context.out.flush();
  return kExitOk;
}

int RunWatch(const CommandContext& context, const std::string& job_id) {
  const bool json = context.output == OutputFormat::kJson;
  WatchPrinterOptions printer_options;
  printer_options.rewrite = context.terminal;
  printer_options.width = context.terminal_width;
  // In JSON mode the printer only follows the job's state; its text goes
  // nowhere (a stream without a buffer drops what is written to it).
  std::ostream discard(nullptr);
  WatchPrinter printer(json ? discard : context.out, printer_options);

  v1::WatchJobRequest request;
  request.set_job_id(job_id);
  request.set_metrics(true);
  absl::Status status =
      context.client.WatchJob(request, [&](const v1::WatchJobEvent& event) {
        if (json) PrintJson(context, event);
        printer.OnEvent(event, context.now());
      });
  if (status.ok() && !printer.Finished()) {
    status = absl::UnavailableError(
        absl::StrCat("the stream ended while ", job_id, " was ",
                     StateName(printer.job().state()), "; `momentum watch ",
                     job_id, "` follows it again"));
  }
  if (!status.ok()) {
    // Finish a progress line drawn in place before the error is printed.
    printer.EndLine();
    return ReportError(context, "WatchJob", status);
  }
  const v1::Job& job = printer.job();
  if (!json) printer.PrintSummary();
  if (job.state() == v1::JOB_STATE_SUCCEEDED) return kExitOk;
  if (json) {
    // The JSON lines carry the reason too; stderr says it to a person.
    context.err << "momentum: " << FormatStateLine(job) << "\n";
  }
  return kExitFailure;
}

int RunCancel(const CommandContext& context, const CancelOptions& options) {
  v1::CancelJobRequest request;
  request.set_job_id(options.job_id);
  request.set_reason(options.reason);
  absl::StatusOr<v1::Job> job = context.client.CancelJob(request);
  if (!job.ok()) return ReportError(context, "CancelJob", job.status());
  if (context.output == OutputFormat::kJson) {
    PrintJson(context, *job);
  } else {
    context.out << FormatStateLine(*job) << "\n";
    context.out.flush();
  }
  return kExitOk;
}

int RunLogs(const CommandContext& context, const LogsOptions& options) {
  const bool json = context.output == OutputFormat::kJson;
  // Lines of several ranks are told apart by a prefix; the job says how many
  // ranks it has (and whether it exists, before the stream starts).
  bool prefix = false;
  if (!json && options.rank < 0) {
    absl::StatusOr<v1::Job> job = context.client.GetJob(options.job_id);
    if (!job.ok()) return ReportError(context, "GetJob", job.status());
    prefix = job->world_size() > 1;
  }
  v1::GetJobLogsRequest request;
  request.set_job_id(options.job_id);
  request.set_rank(options.rank < 0 ? -1 : options.rank);
  request.set_from_line(options.from_line);
  request.set_follow(options.follow);
  absl::Status status =
      context.client.GetJobLogs(request, [&](const v1::LogLine& line) {
        if (json) {
          context.out << ToJson(line) << "\n";
        } else if (prefix) {
          context.out << "[rank " << line.rank() << "] "
                      << EscapeForTerminal(line.text()) << "\n";
        } else {
          context.out << EscapeForTerminal(line.text()) << "\n";
        }
        // Followed lines should show up as they come, also through a pipe.
        if (options.follow) context.out.flush();
      });
  context.out.flush();
  if (!status.ok()) return ReportError(context, "GetJobLogs", status);
  return kExitOk;
}

}  // namespace momentum::client
