#include "client/format.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "common/utf8.h"
#include "google/protobuf/struct.pb.h"
#include "google/protobuf/util/json_util.h"

namespace momentum::client {
namespace {

// Width of a cell in terminal columns: UTF-8 code points, so that a job
// name with accents does not shift the columns after it.
size_t DisplayWidth(absl::string_view text) {
  size_t width = 0;
  for (char c : text) {
    if ((static_cast<unsigned char>(c) & 0xC0) != 0x80) ++width;
  }
  return width;
}

void StripTrailingSpaces(std::string& line) {
  while (!line.empty() && line.back() == ' ') line.pop_back();
}

// Rounds down to one decimal, so that "epoch 3.9" is not shown as "4.0"
// before the fourth epoch is done.
double FloorTenth(double value) {
  // The epsilon keeps 0.3 * 10 = 2.9999999999999996 at 3.
  return std::floor(value * 10.0 + 1e-9) / 10.0;
}

bool HasReport(const v1::JobProgress& progress) {
  return progress.step() != 0 || progress.epoch() != 0.0;
}

std::string OrDash(const std::string& text) {
  return text.empty() ? "-" : text;
}

}  // namespace

std::string StateNamesForHelp() {
  std::vector<std::string> names;
  for (v1::JobState state : kJobStates) {
    names.push_back(absl::AsciiStrToLower(StateName(state)));
  }
  return absl::StrJoin(names, ", ");
}

std::string FormatDuration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "-";
  // Past about 30 000 years the int64 below would overflow; no job runs
  // that long, so such a value is as good as unknown.
  if (seconds > 1e12) return "-";
  const int64_t total = static_cast<int64_t>(std::floor(seconds));
  constexpr int64_t kMinute = 60;
  constexpr int64_t kHour = 60 * kMinute;
  constexpr int64_t kDay = 24 * kHour;
  if (total < kMinute) return absl::StrFormat("%ds", total);
  if (total < kHour) {
    return absl::StrFormat("%dm%02ds", total / kMinute, total % kMinute);
  }
  if (total < kDay) {
    return absl::StrFormat("%dh%02dm", total / kHour, total % kHour / kMinute);
  }
  return absl::StrFormat("%dd%02dh", total / kDay, total % kDay / kHour);
}

std::string FormatPercent(double fraction) {
  if (!std::isfinite(fraction) || fraction < 0) return "-";
  return absl::StrFormat("%.1f%%", fraction * 100.0);
}

std::optional<absl::Time> ToTime(const google::protobuf::Timestamp& time) {
  if (time.seconds() == 0 && time.nanos() == 0) return std::nullopt;
  return absl::FromUnixSeconds(time.seconds()) +
         absl::Nanoseconds(time.nanos());
}

std::string FormatTimestamp(const google::protobuf::Timestamp& time) {
  std::optional<absl::Time> t = ToTime(time);
  if (!t) return "-";
  return absl::FormatTime("%Y-%m-%dT%H:%M:%SZ", *t, absl::UTCTimeZone());
}

std::string FormatProgress(const v1::JobProgress& progress) {
  if (!HasReport(progress)) return "-";
  return absl::StrFormat("epoch %.1f step %d loss %.2f",
                         FloorTenth(progress.epoch()), progress.step(),
                         progress.loss());
}

std::string FormatProgressLine(const v1::Job& job) {
  const v1::JobProgress& progress = job.progress();
  std::vector<std::string> parts;
  if (!HasReport(progress)) {
    parts.push_back(StateName(job.state()));
    if (job.state() == v1::JOB_STATE_PENDING && job.queue_position() > 0) {
      parts.push_back(absl::StrCat("queue position ", job.queue_position()));
    } else if (job.state() == v1::JOB_STATE_RUNNING ||
               job.state() == v1::JOB_STATE_RESTARTING) {
      parts.push_back("waiting for the first report");
    }
    return absl::StrJoin(parts, "  ");
  }
  // A NaN fraction (a server's or a rank's bug) would survive the clamp and
  // its conversion to int is undefined; it shows as 0%.
  const double fraction = std::isnan(progress.fraction())
                              ? 0.0
                              : std::clamp(progress.fraction(), 0.0, 1.0);
  // Whole percent, rounded down (100% only when done); the epsilon keeps
  // 0.29 * 100 = 28.999999999999996 at 29.
  const int percent = static_cast<int>(std::floor(fraction * 100.0 + 1e-9));
  parts.push_back(absl::StrFormat("%s %d%%", StateName(job.state()), percent));
  parts.push_back(FormatProgress(progress));
  if (progress.images_per_second() > 0) {
    parts.push_back(
        absl::StrFormat("%.0f img/s", progress.images_per_second()));
  }
  if (progress.eta_seconds() >= 0 && !IsFinalState(job.state())) {
    parts.push_back(
        absl::StrCat("ETA ", FormatDuration(progress.eta_seconds())));
  }
  if (progress.knn_top1() >= 0) {
    parts.push_back(absl::StrCat("kNN ", FormatPercent(progress.knn_top1())));
  }
  return absl::StrJoin(parts, "  ");
}

std::string FormatAgeOrDuration(const v1::Job& job, absl::Time now) {
  std::optional<absl::Time> submit = ToTime(job.submit_time());
  if (IsFinalState(job.state())) return FormatWallTime(job);
  if (!submit) return "-";
  // A client clock behind the server's would give a negative age.
  return FormatDuration(
      absl::ToDoubleSeconds(std::max(now - *submit, absl::ZeroDuration())));
}

std::string FormatWallTime(const v1::Job& job) {
  std::optional<absl::Time> end = ToTime(job.end_time());
  std::optional<absl::Time> begin = ToTime(job.start_time());
  if (!begin) begin = ToTime(job.submit_time());
  if (!end || !begin) return "-";
  return FormatDuration(
      absl::ToDoubleSeconds(std::max(*end - *begin, absl::ZeroDuration())));
}

std::vector<std::string> JobTableHeader() {
  return {"ID",    "NAME",     "STATE", "PRIORITY",    "RANKS",
          "QUEUE", "PROGRESS", "KNN",   "AGE/DURATION"};
}

std::vector<std::string> JobRow(const v1::Job& job, absl::Time now) {
  return {
      EscapeForTerminal(job.id()),
      OrDash(EscapeForTerminal(job.name())),
      StateName(job.state()),
      absl::StrCat(job.priority()),
      absl::StrCat(job.world_size()),
      job.queue_position() > 0 ? absl::StrCat(job.queue_position()) : "-",
      FormatProgress(job.progress()),
      FormatPercent(job.progress().knn_top1()),
      FormatAgeOrDuration(job, now),
  };
}

std::string RenderTable(const std::vector<std::string>& header,
                        const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> widths(header.size(), 0);
  auto measure = [&widths](const std::vector<std::string>& row) {
    if (row.size() > widths.size()) widths.resize(row.size(), 0);
    for (size_t i = 0; i < row.size(); ++i) {
      widths[i] = std::max(widths[i], DisplayWidth(row[i]));
    }
  };
  measure(header);
  for (const auto& row : rows) measure(row);

  std::string out;
  auto render = [&widths, &out](const std::vector<std::string>& row) {
    std::string line;
    for (size_t i = 0; i < widths.size(); ++i) {
      const std::string cell = i < row.size() ? row[i] : "";
      if (i > 0) line += "  ";
      line += cell;
      line.append(widths[i] - DisplayWidth(cell), ' ');
    }
    StripTrailingSpaces(line);
    out += line;
    out += '\n';
  };
  render(header);
  for (const auto& row : rows) render(row);
  return out;
}

std::string RenderKeyValues(const KeyValues& fields, absl::string_view indent) {
  size_t width = 0;
  for (const auto& [key, value] : fields) {
    width = std::max(width, DisplayWidth(key));
  }
  std::string out;
  for (const auto& [key, value] : fields) {
    std::string line = absl::StrCat(indent, key, ":");
    line.append(width - DisplayWidth(key) + 1, ' ');
    line += value;
    StripTrailingSpaces(line);
    out += line;
    out += '\n';
  }
  return out;
}

KeyValues JobFields(const v1::Job& job) {
  const v1::JobProgress& p = job.progress();
  return {
      {"id", EscapeForTerminal(job.id())},
      {"name", OrDash(EscapeForTerminal(job.name()))},
      {"owner", OrDash(EscapeForTerminal(job.owner()))},
      {"state", StateName(job.state())},
      {"state_reason", OrDash(EscapeForTerminal(OneLine(job.state_reason())))},
      {"priority", absl::StrCat(job.priority())},
      {"world_size", absl::StrCat(job.world_size())},
      {"queue_position",
       job.queue_position() > 0 ? absl::StrCat(job.queue_position()) : "-"},
      {"output_dir", OrDash(EscapeForTerminal(job.output_dir()))},
      {"submit_time", FormatTimestamp(job.submit_time())},
      {"start_time", FormatTimestamp(job.start_time())},
      {"end_time", FormatTimestamp(job.end_time())},
      {"restarts", absl::StrCat(job.restarts())},
      {"progress.epoch", absl::StrFormat("%.2f", p.epoch())},
      {"progress.step", absl::StrCat(p.step())},
      {"progress.fraction", FormatPercent(p.fraction())},
      {"progress.loss", absl::StrFormat("%.4f", p.loss())},
      {"progress.learning_rate", absl::StrFormat("%g", p.learning_rate())},
      {"progress.images_per_second",
       absl::StrFormat("%.1f", p.images_per_second())},
      {"progress.eta_seconds", FormatDuration(p.eta_seconds())},
      {"progress.knn_top1", FormatPercent(p.knn_top1())},
      {"export_path", OrDash(EscapeForTerminal(job.export_path()))},
  };
}

std::string FormatSubmitted(const v1::Job& job) {
  std::string out = absl::StrCat("submitted ", EscapeForTerminal(job.id()));
  if (!job.name().empty()) {
    absl::StrAppend(&out, " (", EscapeForTerminal(job.name()), ")");
  }
  absl::StrAppend(&out, ", ", StateName(job.state()));
  if (job.queue_position() > 0) {
    absl::StrAppend(&out, ", queue position ", job.queue_position());
  }
  return out;
}

std::string FormatStateLine(const v1::Job& job) {
  std::string out =
      absl::StrCat(EscapeForTerminal(job.id()), " ", StateName(job.state()));
  std::string reason = EscapeForTerminal(OneLine(job.state_reason()));
  if (!reason.empty()) absl::StrAppend(&out, ": ", reason);
  return out;
}

std::string FormatSummary(const v1::Job& job) {
  KeyValues fields = {
      {"steps", absl::StrCat(job.progress().step())},
      {"kNN top-1", FormatPercent(job.progress().knn_top1())},
      {"export", OrDash(EscapeForTerminal(job.export_path()))},
      {"wall time", FormatWallTime(job)},
  };
  if (job.restarts() > 0) {
    fields.emplace_back("restarts", absl::StrCat(job.restarts()));
  }
  return RenderKeyValues(fields, "  ");
}

std::string ToJson(const google::protobuf::Message& message) {
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = false;
  options.always_print_primitive_fields = true;
  options.preserve_proto_field_names = true;
  std::string json;
  const auto status =
      google::protobuf::util::MessageToJsonString(message, &json, options);
  // Fails for a message that parsed but has no JSON form (a Timestamp
  // past the year 9999, say): whatever a server sends, the client says so
  // in JSON of its own instead of stopping.
  if (!status.ok()) {
    google::protobuf::Struct error;
    (*error.mutable_fields())["error"].set_string_value(absl::StrCat(
        "cannot write ", message.GetTypeName(), " as JSON: ",
        absl::string_view(status.message().data(), status.message().size())));
    json.clear();
    if (!google::protobuf::util::MessageToJsonString(error, &json, options)
             .ok()) {
      json = "{\"error\":\"cannot write the message as JSON\"}";
    }
  }
  return json;
}

std::string EscapeForTerminal(absl::string_view text) {
  std::string out;
  out.reserve(text.size());
  const std::string_view view(text.data(), text.size());
  size_t i = 0;
  while (i < view.size()) {
    uint32_t code = 0;
    const size_t length = Utf8SequenceAt(view, i, &code);
    if (length == 0) {  // not UTF-8
      absl::StrAppend(
          &out,
          absl::StrFormat("\\x%02x", static_cast<unsigned char>(view[i])));
      ++i;
      continue;
    }
    const bool c0 = (code < 0x20 && code != '\t') || code == 0x7F;
    const bool c1 = code >= 0x80 && code <= 0x9F;
    const bool bidi = (code >= 0x202A && code <= 0x202E) ||
                      (code >= 0x2066 && code <= 0x2069);
    if (c0) {
      absl::StrAppend(&out, absl::StrFormat("\\x%02x", code));
    } else if (c1 || bidi) {
      absl::StrAppend(&out, absl::StrFormat("\\u%04x", code));
    } else {
      out.append(view.data() + i, length);
    }
    i += length;
  }
  return out;
}

std::string OneLine(absl::string_view text) {
  std::string out =
      absl::StrReplaceAll(absl::StripAsciiWhitespace(text),
                          {{"\r\n", "; "}, {"\n", "; "}, {"\r", "; "}});
  return out;
}

}  // namespace momentum::client
