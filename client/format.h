// Text the `momentum` client prints: job states, durations, percentages,
// progress lines, aligned tables and "key: value" blocks. Pure functions of
// their arguments (the current time is passed in), so they are tested with
// strings written out by hand.
//
// Usage:
//   std::vector<std::vector<std::string>> rows;
//   for (const v1::Job& job : response.jobs()) {
//     rows.push_back(JobRow(job, absl::Now()));
//   }
//   std::cout << RenderTable(JobTableHeader(), rows);
#ifndef MOMENTUM_CLIENT_FORMAT_H_
#define MOMENTUM_CLIENT_FORMAT_H_

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "common/job_state.h"
#include "google/protobuf/message.h"
#include "google/protobuf/timestamp.pb.h"
#include "momentum/v1/jobs.pb.h"

namespace momentum::client {

namespace v1 = ::momentum::v1;

// The job states' names, parsing and finality (common/job_state.h):
// StateName(state) gives "PENDING", ..., "CANCELLED" ("UNSPECIFIED" for 0
// and for values this client does not know); ParseState(text) parses a
// state given on the command line ("running", "JOB_STATE_RUNNING",
// "canceled"; nullopt for anything else, UNSPECIFIED included).
using ::momentum::ParseState;
using ::momentum::StateName;

// The names ParseState accepts, lower case, comma-separated, for help and
// error text: "pending, running, restarting, succeeded, failed, cancelled".
std::string StateNamesForHelp();

// True for SUCCEEDED, FAILED and CANCELLED (momentum::IsFinal).
inline bool IsFinalState(v1::JobState state) { return IsFinal(state); }

// A duration rounded down to whole seconds, in its two largest units:
// "12s", "3m05s", "1h02m", "2d03h"; "0s" below one second; "-" when
// negative (the proto's "unknown").
std::string FormatDuration(double seconds);

// A fraction in [0, 1] as a percentage with one decimal: 0.7134 -> "71.3%";
// "-" when negative (not measured yet).
std::string FormatPercent(double fraction);

// A timestamp in UTC, RFC 3339 to the second: "2024-05-01T12:00:03Z"; "-"
// when unset (all zero).
std::string FormatTimestamp(const google::protobuf::Timestamp& time);

// Converts a proto timestamp; nullopt when unset.
std::optional<absl::Time> ToTime(const google::protobuf::Timestamp& time);

// Training progress in one short phrase, as in the list's PROGRESS column:
// "epoch 3.2 step 700 loss 4.81"; "-" before the first report (step 0).
std::string FormatProgress(const v1::JobProgress& progress);

// The live line of `momentum watch`: state, percentage done, the progress
// phrase, throughput, ETA and kNN when known:
// "RUNNING 32%  epoch 3.2 step 700 loss 4.81  1250 img/s  ETA 3m05s  kNN
// 71.3%" (one line). Before the first report: "PENDING  queue position 2" or
// "RUNNING  waiting for the first report".
std::string FormatProgressLine(const v1::Job& job);

// The time shown in the list's AGE/DURATION column: for a job that ended,
// how long it ran (end minus start, or minus submission if it never
// started); otherwise its age (now minus submission). "-" when the times
// needed are unset.
std::string FormatAgeOrDuration(const v1::Job& job, absl::Time now);

// The wall time of a job that ended: end minus start (or submission);
// "-" when unknown.
std::string FormatWallTime(const v1::Job& job);

// Header and one row of `momentum list`: ID, NAME, STATE, PRIORITY, RANKS,
// QUEUE, PROGRESS, KNN, AGE/DURATION.
std::vector<std::string> JobTableHeader();
std::vector<std::string> JobRow(const v1::Job& job, absl::Time now);

// Renders rows under a header as left-aligned columns separated by two
// spaces, one line per row, each ending in '\n', with no trailing spaces.
// Rows shorter than the header are padded with empty cells.
std::string RenderTable(const std::vector<std::string>& header,
                        const std::vector<std::vector<std::string>>& rows);

using KeyValues = std::vector<std::pair<std::string, std::string>>;

// Renders "key: value" lines with the values aligned one space after the
// longest key's colon, each line prefixed with `indent`.
std::string RenderKeyValues(const KeyValues& fields,
                            absl::string_view indent = "");

// Every field of a job for `momentum get`, keyed by its proto field name
// (progress fields as "progress.loss"), formatted for reading: states by
// name, times in UTC, fractions as percentages, "-" for unset or unknown
// values. spec_yaml is left out; `momentum get --spec` prints it after.
KeyValues JobFields(const v1::Job& job);

// The one-line answer of `momentum submit`:
// "submitted job-3 (fashion-mnist), PENDING, queue position 1".
std::string FormatSubmitted(const v1::Job& job);

// "job-3 CANCELLED: cancelled by request" ("job-3 CANCELLED" when there is no
// reason).
std::string FormatStateLine(const v1::Job& job);

// The summary `momentum watch` ends with, after the final state line:
// steps, final kNN top-1, export path, wall time as indented key: values.
std::string FormatSummary(const v1::Job& job);

// A message as one line of JSON in protobuf's mapping, field names as in the
// proto and every field written, defaults included (enums by name, int64 as
// strings, times in RFC 3339), so that scripts see the proto's shape.
std::string ToJson(const google::protobuf::Message& message);

// Replaces line breaks with "; " and trims, so an error message prints as
// one line.
std::string OneLine(absl::string_view text);

// Text that came from another user or a rank (names, owners, reasons,
// paths, log lines, notices, server errors) made safe to print on a
// terminal: every control character but tab (C0, DEL) becomes "\xHH", C1
// controls (U+0080-U+009F) and the bidirectional overrides and isolates
// (U+202A-U+202E, U+2066-U+2069, which reorder what is shown) become
// "\uHHHH", and bytes that are not UTF-8 become "\xHH"; valid printable
// UTF-8 is kept as it is. "\x1b[2J" (clear the screen) prints as the six
// characters \x1b[2J. Backslashes are kept, so the escapes are for people,
// not for parsing back.
std::string EscapeForTerminal(absl::string_view text);

}  // namespace momentum::client

#endif  // MOMENTUM_CLIENT_FORMAT_H_
