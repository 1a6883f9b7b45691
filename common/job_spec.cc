#include "common/job_spec.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <functional>
#include <initializer_list>
#include <set>
#include <sstream>
#include <string>
#include <system_error>
#include <utility>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "common/file_util.h"
#include "common/status_macros.h"
#include "yaml-cpp/eventhandler.h"
#include "yaml-cpp/yaml.h"

namespace momentum {
namespace {

// Takes the parser's events and keeps none: for counting documents.
class NullEventHandler : public YAML::EventHandler {
 public:
  void OnDocumentStart(const YAML::Mark&) override {}
  void OnDocumentEnd() override {}
  void OnNull(const YAML::Mark&, YAML::anchor_t) override {}
  void OnAlias(const YAML::Mark&, YAML::anchor_t) override {}
  void OnScalar(const YAML::Mark&, const std::string&, YAML::anchor_t,
                const std::string&) override {}
  void OnSequenceStart(const YAML::Mark&, const std::string&, YAML::anchor_t,
                       YAML::EmitterStyle::value) override {}
  void OnSequenceEnd() override {}
  void OnMapStart(const YAML::Mark&, const std::string&, YAML::anchor_t,
                  YAML::EmitterStyle::value) override {}
  void OnMapEnd() override {}
};

// ---------------------------------------------------------------------------
// The schema: one row per leaf field, in the order of the structs in
// job_spec.h. The dotted path is the member expression itself, so the YAML
// names cannot drift from the C++ names.

using FieldRef = std::variant<std::string*, int64_t*, uint64_t*, double*, bool*,
                              std::vector<double>*>;

struct Field {
  absl::string_view path;
  FieldRef (*get)(JobSpec&);
};

#define MOMENTUM_SPEC_FIELD(member)                            \
  Field {                                                      \
#member, [](JobSpec & s) -> FieldRef { return &s.member; } \
  }

constexpr Field kFields[] = {
    MOMENTUM_SPEC_FIELD(name),
    MOMENTUM_SPEC_FIELD(seed),
    MOMENTUM_SPEC_FIELD(output_dir),
    MOMENTUM_SPEC_FIELD(model.arch),
    MOMENTUM_SPEC_FIELD(model.width),
    MOMENTUM_SPEC_FIELD(model.in_channels),
    MOMENTUM_SPEC_FIELD(model.small_stem),
    MOMENTUM_SPEC_FIELD(moco.version),
    MOMENTUM_SPEC_FIELD(moco.dim),
    MOMENTUM_SPEC_FIELD(moco.queue_size),
    MOMENTUM_SPEC_FIELD(moco.momentum),
    MOMENTUM_SPEC_FIELD(moco.temperature),
    MOMENTUM_SPEC_FIELD(moco.mlp),
    MOMENTUM_SPEC_FIELD(moco.bn),
    MOMENTUM_SPEC_FIELD(moco.bn_groups),
    MOMENTUM_SPEC_FIELD(data.format),
    MOMENTUM_SPEC_FIELD(data.path),
    MOMENTUM_SPEC_FIELD(data.image_size),
    MOMENTUM_SPEC_FIELD(data.loader_threads),
    MOMENTUM_SPEC_FIELD(data.prefetch),
    MOMENTUM_SPEC_FIELD(data.limit),
    MOMENTUM_SPEC_FIELD(data.scaled_decode),
    MOMENTUM_SPEC_FIELD(data.augment_on),
    MOMENTUM_SPEC_FIELD(data.augment.crop_min_scale),
    MOMENTUM_SPEC_FIELD(data.augment.crop_max_scale),
    MOMENTUM_SPEC_FIELD(data.augment.jitter_brightness),
    MOMENTUM_SPEC_FIELD(data.augment.jitter_contrast),
    MOMENTUM_SPEC_FIELD(data.augment.jitter_saturation),
    MOMENTUM_SPEC_FIELD(data.augment.jitter_hue),
    MOMENTUM_SPEC_FIELD(data.augment.jitter_prob),
    MOMENTUM_SPEC_FIELD(data.augment.grayscale_prob),
    MOMENTUM_SPEC_FIELD(data.augment.blur),
    MOMENTUM_SPEC_FIELD(data.augment.blur_prob),
    MOMENTUM_SPEC_FIELD(data.augment.blur_sigma_min),
    MOMENTUM_SPEC_FIELD(data.augment.blur_sigma_max),
    MOMENTUM_SPEC_FIELD(data.augment.hflip_prob),
    MOMENTUM_SPEC_FIELD(data.augment.mean),
    MOMENTUM_SPEC_FIELD(data.augment.std),
    MOMENTUM_SPEC_FIELD(optim.batch_size),
    MOMENTUM_SPEC_FIELD(optim.lr),
    MOMENTUM_SPEC_FIELD(optim.momentum),
    MOMENTUM_SPEC_FIELD(optim.weight_decay),
    MOMENTUM_SPEC_FIELD(optim.schedule),
    MOMENTUM_SPEC_FIELD(optim.warmup),
    MOMENTUM_SPEC_FIELD(optim.milestones),
    MOMENTUM_SPEC_FIELD(optim.gamma),
    MOMENTUM_SPEC_FIELD(optim.epochs),
    MOMENTUM_SPEC_FIELD(optim.steps),
    MOMENTUM_SPEC_FIELD(optim.time_budget_s),
    MOMENTUM_SPEC_FIELD(eval.every_epochs),
    MOMENTUM_SPEC_FIELD(eval.knn_k),
    MOMENTUM_SPEC_FIELD(eval.knn_temperature),
    MOMENTUM_SPEC_FIELD(eval.batch_size),
    MOMENTUM_SPEC_FIELD(eval.max_train),
    MOMENTUM_SPEC_FIELD(eval.max_test),
    MOMENTUM_SPEC_FIELD(checkpoint.every_steps),
    MOMENTUM_SPEC_FIELD(checkpoint.every_epochs),
    MOMENTUM_SPEC_FIELD(checkpoint.keep),
    MOMENTUM_SPEC_FIELD(checkpoint.resume),
    MOMENTUM_SPEC_FIELD(logging.every_steps),
    MOMENTUM_SPEC_FIELD(resources.threads),
    MOMENTUM_SPEC_FIELD(resources.nproc),
    MOMENTUM_SPEC_FIELD(resources.backend),
    MOMENTUM_SPEC_FIELD(resources.device),
    MOMENTUM_SPEC_FIELD(resources.precision),
    MOMENTUM_SPEC_FIELD(resources.cpu_affinity),
    MOMENTUM_SPEC_FIELD(resources.timeout_s),
    MOMENTUM_SPEC_FIELD(scheduling.priority),
    MOMENTUM_SPEC_FIELD(scheduling.max_restarts),
    MOMENTUM_SPEC_FIELD(scheduling.restart_backoff_s),
    MOMENTUM_SPEC_FIELD(scheduling.hang_timeout_s),
    MOMENTUM_SPEC_FIELD(scheduling.straggler_factor),
    MOMENTUM_SPEC_FIELD(faults.on_nonfinite),
    MOMENTUM_SPEC_FIELD(faults.on_collapse),
    MOMENTUM_SPEC_FIELD(faults.collapse_std_ratio),
    MOMENTUM_SPEC_FIELD(faults.collapse_patience),
    MOMENTUM_SPEC_FIELD(faults.rollback_lr_factor),
    MOMENTUM_SPEC_FIELD(faults.max_rollbacks),
};

#undef MOMENTUM_SPEC_FIELD

const Field* FindField(absl::string_view path) {
  for (const Field& field : kFields) {
    if (field.path == path) return &field;
  }
  return nullptr;
}

// The dotted path of the section that holds `path`; "" for the top level.
absl::string_view ParentOf(absl::string_view path) {
  const size_t dot = path.rfind('.');
  return dot == absl::string_view::npos ? absl::string_view()
                                        : path.substr(0, dot);
}

// Sections ("model", "data", "data.augment", ...): every proper prefix of a
// field path. The top level is not in the set.
const std::set<std::string, std::less<>>& Sections() {
  static const auto* const sections = [] {
    auto* result = new std::set<std::string, std::less<>>();
    for (const Field& field : kFields) {
      for (absl::string_view parent = ParentOf(field.path); !parent.empty();
           parent = ParentOf(parent)) {
        result->emplace(parent);
      }
    }
    return result;
  }();
  return *sections;
}

bool IsSection(absl::string_view path) {
  return Sections().find(path) != Sections().end();
}

// Fields and sections directly inside `section` ("" for the top level), as
// full dotted paths.
std::vector<std::string> ChildrenOf(absl::string_view section) {
  std::vector<std::string> children;
  for (const Field& field : kFields) {
    if (ParentOf(field.path) == section) children.emplace_back(field.path);
  }
  for (const std::string& name : Sections()) {
    if (ParentOf(name) == section) children.push_back(name);
  }
  return children;
}

std::vector<std::string> AllPaths() {
  std::vector<std::string> paths(Sections().begin(), Sections().end());
  for (const Field& field : kFields) paths.emplace_back(field.path);
  return paths;
}

size_t EditDistance(absl::string_view a, absl::string_view b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t above = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1,
                         diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = above;
    }
  }
  return row[b.size()];
}

// "unknown field moco.temprature (did you mean moco.temperature?)"; the hint
// names a candidate a few edits away (a typo) or, failing that, one whose
// name starts the key or is started by it.
std::string UnknownField(absl::string_view path,
                         const std::vector<std::string>& candidates) {
  std::string message = absl::StrCat("unknown field ", path);
  const std::string* best = nullptr;
  size_t best_distance = 0;
  for (const std::string& candidate : candidates) {
    const size_t distance = EditDistance(path, candidate);
    if (best == nullptr || distance < best_distance) {
      best = &candidate;
      best_distance = distance;
    }
  }
  const absl::string_view key = path.substr(path.rfind('.') + 1);
  if (best != nullptr && best_distance < key.size() &&
      best_distance <= std::max<size_t>(2, key.size() / 3)) {
    absl::StrAppend(&message, " (did you mean ", *best, "?)");
    return message;
  }
  // No typo close enough: a longer or shorter spelling of a field
  // ("optimizer" for "optim", "temp" for "temperature").
  if (key.size() >= 3) {
    for (const std::string& candidate : candidates) {
      const absl::string_view name =
          absl::string_view(candidate).substr(candidate.rfind('.') + 1);
      if (absl::StartsWith(key, name) || absl::StartsWith(name, key)) {
        absl::StrAppend(&message, " (did you mean ", candidate, "?)");
        break;
      }
    }
  }
  return message;
}

// ---------------------------------------------------------------------------
// Formatting of values in messages and in the YAML output.

// The shortest text that reads back as the same double (0.1, not
// 0.10000000000000001), independent of the C locale, so that every value
// round-trips through the YAML. Plain decimals while they stay short (0.0001
// rather than 1e-04); otherwise scientific with a point in the mantissa and a
// signed exponent (1.0e-300), the float form YAML 1.1 readers such as PyYAML
// also recognise.
std::string FormatDouble(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  constexpr ptrdiff_t kMaxFixedLength = 24;
  char buffer[512];  // enough for any double in fixed notation
  const std::to_chars_result fixed = std::to_chars(
      buffer, buffer + sizeof(buffer), value, std::chars_format::fixed);
  if (fixed.ec == std::errc() && fixed.ptr - buffer <= kMaxFixedLength) {
    return std::string(buffer, fixed.ptr);
  }
  const std::to_chars_result scientific = std::to_chars(
      buffer, buffer + sizeof(buffer), value, std::chars_format::scientific);
  std::string text(buffer, scientific.ptr);
  const size_t exponent = text.find('e');
  if (text.find('.') == std::string::npos) text.insert(exponent, ".0");
  return text;
}

std::string FormatList(const std::vector<double>& values) {
  return absl::StrCat("[",
                      absl::StrJoin(values, ", ",
                                    [](std::string* out, double value) {
                                      out->append(FormatDouble(value));
                                    }),
                      "]");
}

std::string Quote(absl::string_view text) {
  return absl::StrCat("\"", absl::CHexEscape(text), "\"");
}

// What a YAML node holds, for "must be an integer, got ..." messages.
std::string Describe(const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Scalar: {
      // Long values are cut: the message names the field, and a megabyte of
      // pasted text in an error helps nobody.
      constexpr size_t kMaxShown = 64;
      const std::string& text = node.Scalar();
      if (text.size() <= kMaxShown) return Quote(text);
      return absl::StrCat(Quote(text.substr(0, kMaxShown)), "...");
    }
    case YAML::NodeType::Sequence:
      return "a list";
    case YAML::NodeType::Map:
      return "a map";
    case YAML::NodeType::Null:
    case YAML::NodeType::Undefined:
      return "null";
  }
  return "null";
}

// ---------------------------------------------------------------------------
// YAML tree -> JobSpec.

bool ParseBool(const std::string& text, bool* value) {
  // YAML 1.2 core schema; YAML 1.1's yes/no/on/off are too easy to write by
  // accident (a country code "no") to accept silently.
  if (text == "true" || text == "True" || text == "TRUE") {
    *value = true;
    return true;
  }
  if (text == "false" || text == "False" || text == "FALSE") {
    *value = false;
    return true;
  }
  return false;
}

class TreeReader {
 public:
  TreeReader(JobSpec* spec, std::set<std::string>* set_paths,
             std::vector<std::string>* errors)
      : spec_(spec), set_paths_(set_paths), errors_(errors) {}

  // Reads every key of `map`, the section at `prefix` ("" for the top level).
  void ReadSection(const YAML::Node& map, const std::string& prefix) {
    std::set<std::string> seen;
    for (const auto& entry : map) {
      const YAML::Node& key = entry.first;
      const YAML::Node& value = entry.second;
      if (!key.IsScalar()) {
        errors_->push_back(absl::StrCat(prefix.empty() ? "" : prefix + ": ",
                                        "field names must be strings, got ",
                                        Describe(key)));
        continue;
      }
      // "moco.temperature: 1" at the top level would otherwise alias the
      // nested field and slip past the duplicate check.
      if (absl::StrContains(key.Scalar(), '.')) {
        errors_->push_back(
            absl::StrCat(prefix.empty() ? "" : prefix + ": ", "field name ",
                         Quote(key.Scalar()),
                         " must not contain dots (nest it under its section)"));
        continue;
      }
      const std::string path = prefix.empty()
                                   ? key.Scalar()
                                   : absl::StrCat(prefix, ".", key.Scalar());
      if (!seen.insert(key.Scalar()).second) {
        errors_->push_back(absl::StrCat("duplicate field ", path));
        continue;
      }
      if (const Field* field = FindField(path)) {
        std::visit([&](auto* out) { Read(path, value, out); },
                   field->get(*spec_));
        set_paths_->insert(path);
      } else if (IsSection(path)) {
        // An empty section ("moco:" with nothing under it) keeps defaults.
        if (value.IsNull()) continue;
        if (!value.IsMap()) {
          errors_->push_back(
              absl::StrCat(path, " must be a map, got ", Describe(value)));
          continue;
        }
        ReadSection(value, path);
      } else {
        errors_->push_back(UnknownField(path, ChildrenOf(prefix)));
      }
    }
  }

 private:
  void TypeError(absl::string_view path, absl::string_view expected,
                 const YAML::Node& node) {
    errors_->push_back(
        absl::StrCat(path, " must be ", expected, ", got ", Describe(node)));
  }

  void Read(absl::string_view path, const YAML::Node& node, std::string* out) {
    if (!node.IsScalar()) return TypeError(path, "a string", node);
    *out = node.Scalar();
  }

  void Read(absl::string_view path, const YAML::Node& node, int64_t* out) {
    if (!node.IsScalar() || !absl::SimpleAtoi(node.Scalar(), out)) {
      TypeError(path, "an integer", node);
    }
  }

  void Read(absl::string_view path, const YAML::Node& node, uint64_t* out) {
    if (!node.IsScalar() || absl::StrContains(node.Scalar(), '-') ||
        !absl::SimpleAtoi(node.Scalar(), out)) {
      TypeError(path, "an unsigned 64-bit integer", node);
    }
  }

  void Read(absl::string_view path, const YAML::Node& node, bool* out) {
    if (!node.IsScalar() || !ParseBool(node.Scalar(), out)) {
      TypeError(path, "a boolean (true or false)", node);
    }
  }

  void Read(absl::string_view path, const YAML::Node& node, double* out) {
    double value = 0;
    if (!node.IsScalar() || !absl::SimpleAtod(node.Scalar(), &value)) {
      return TypeError(path, "a number", node);
    }
    if (!std::isfinite(value)) return TypeError(path, "a finite number", node);
    *out = value;
  }

  void Read(absl::string_view path, const YAML::Node& node,
            std::vector<double>* out) {
    if (!node.IsSequence()) return TypeError(path, "a list of numbers", node);
    std::vector<double> values(node.size());
    const size_t errors_before = errors_->size();
    for (size_t i = 0; i < node.size(); ++i) {
      Read(absl::StrCat(path, "[", i, "]"), node[i], &values[i]);
    }
    if (errors_->size() == errors_before) *out = std::move(values);
  }

  JobSpec* spec_;
  std::set<std::string>* set_paths_;
  std::vector<std::string>* errors_;
};

// Sets `parts` under `node` to `value`, turning whatever is in the way into
// maps. `node` shares its data with the tree it came from (yaml-cpp nodes are
// handles), so the tree changes in place.
void SetPath(YAML::Node node, const std::vector<std::string>& parts, size_t i,
             const YAML::Node& value) {
  if (i + 1 == parts.size()) {
    node[parts[i]] = value;
    return;
  }
  YAML::Node child = node[parts[i]];
  if (child.IsMap()) {
    SetPath(child, parts, i + 1, value);
    return;
  }
  YAML::Node section(YAML::NodeType::Map);
  SetPath(section, parts, i + 1, value);
  node[parts[i]] = section;
}

// Applies one "dotted.path=value" override; the error names the override.
absl::Status ApplyOverride(YAML::Node& root, const std::string& override_text) {
  const size_t equals = override_text.find('=');
  const std::string path(absl::StripAsciiWhitespace(
      absl::string_view(override_text).substr(0, equals)));
  if (equals == std::string::npos || path.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "override ", Quote(override_text), ": expected dotted.path=value"));
  }
  if (FindField(path) == nullptr && !IsSection(path)) {
    return absl::InvalidArgumentError(
        absl::StrCat("override ", Quote(override_text), ": ",
                     UnknownField(path, AllPaths())));
  }
  YAML::Node value;
  try {
    value = YAML::Load(override_text.substr(equals + 1));
  } catch (const YAML::ParserException& e) {
    return absl::InvalidArgumentError(absl::StrCat(
        "override ", Quote(override_text), ": invalid YAML value: ", e.msg));
  }
  SetPath(root, absl::StrSplit(path, '.'), 0, value);
  return absl::OkStatus();
}

// Gives the fields marked (v) in job_spec.h the default of `spec.moco.version`
// unless the YAML set them.
void ApplyVersionDefaults(const std::set<std::string>& set_paths,
                          JobSpec* spec) {
  const bool v1 = spec->moco.version == "v1";
  auto unset = [&](const char* path) { return set_paths.count(path) == 0; };
  if (unset("moco.temperature")) spec->moco.temperature = v1 ? 0.07 : 0.2;
  if (unset("moco.mlp")) spec->moco.mlp = !v1;
  if (unset("data.augment.blur")) spec->data.augment.blur = !v1;
  if (unset("optim.schedule")) spec->optim.schedule = v1 ? "step" : "cosine";
}

// ---------------------------------------------------------------------------
// Validation.

// Collects one message per broken rule, each naming the field and the rule.
class RuleChecker {
 public:
  const std::vector<std::string>& errors() const { return errors_; }

  void Fail(std::string message) { errors_.push_back(std::move(message)); }

  void AtLeast(absl::string_view field, int64_t value, int64_t min) {
    if (value < min)
      Fail(absl::StrCat(field, " must be >= ", min, ", got ", value));
  }

  void Between(absl::string_view field, int64_t value, int64_t min,
               int64_t max) {
    if (value < min || value > max) {
      Fail(absl::StrCat(field, " must be in [", min, ", ", max, "], got ",
                        value));
    }
  }

  void OneOf(absl::string_view field, int64_t value,
             std::initializer_list<int64_t> allowed) {
    if (std::find(allowed.begin(), allowed.end(), value) == allowed.end()) {
      Fail(absl::StrCat(field, " must be one of ", absl::StrJoin(allowed, ", "),
                        ", got ", value));
    }
  }

  void OneOf(absl::string_view field, const std::string& value,
             std::initializer_list<absl::string_view> allowed) {
    if (std::find(allowed.begin(), allowed.end(), value) == allowed.end()) {
      Fail(absl::StrCat(field, " must be one of ", absl::StrJoin(allowed, ", "),
                        ", got ", Quote(value)));
    }
  }

  void NotEmpty(absl::string_view field, const std::string& value) {
    if (value.empty()) Fail(absl::StrCat(field, " must not be empty"));
  }

  void MaxBytes(absl::string_view field, const std::string& value,
                int64_t max) {
    if (static_cast<int64_t>(value.size()) > max) {
      Fail(absl::StrCat(field, " must have at most ", max, " bytes, got ",
                        value.size()));
    }
  }

  // A path of at most `max` bytes without control characters: the system
  // calls that open it end it at a NUL ("/data/..\0x" opens "/data/..",
  // which a check of the whole string would take for a folder under
  // /data), and a newline or escape would reach logs and terminals.
  void PathText(absl::string_view field, const std::string& value,
                int64_t max) {
    MaxBytes(field, value, max);
    for (size_t i = 0; i < value.size(); ++i) {
      const unsigned char c = static_cast<unsigned char>(value[i]);
      if (c < 0x20 || c == 0x7f) {
        Fail(absl::StrCat(field,
                          " must not contain control characters, got byte ",
                          static_cast<int>(c), " at offset ", i));
        return;
      }
    }
  }

  // The double rules reject NaN and infinities first (the comparisons below
  // are false for NaN, which would let it through).
  void Greater(absl::string_view field, double value, double min) {
    if (!Finite(field, value)) return;
    if (!(value > min)) Fail(Message(field, "> ", min, value));
  }

  void AtLeast(absl::string_view field, double value, double min) {
    if (!Finite(field, value)) return;
    if (!(value >= min)) Fail(Message(field, ">= ", min, value));
  }

  // The one-sided rules above with an upper bound too; each side says its
  // own rule ("must be > 0", "must be <= 100").
  void Greater(absl::string_view field, double value, double min, double max) {
    if (!Finite(field, value)) return;
    if (!(value > min)) return Fail(Message(field, "> ", min, value));
    if (value > max) Fail(Message(field, "<= ", max, value));
  }

  void AtLeast(absl::string_view field, double value, double min, double max) {
    if (!Finite(field, value)) return;
    if (!(value >= min)) return Fail(Message(field, ">= ", min, value));
    if (value > max) Fail(Message(field, "<= ", max, value));
  }

  // value in the interval [min, max], with either end open when asked.
  void InRange(absl::string_view field, double value, double min, bool min_open,
               double max, bool max_open) {
    if (!Finite(field, value)) return;
    const bool above = min_open ? value > min : value >= min;
    const bool below = max_open ? value < max : value <= max;
    if (!above || !below) {
      Fail(absl::StrCat(field, " must be in ", min_open ? "(" : "[",
                        FormatDouble(min), ", ", FormatDouble(max),
                        max_open ? ")" : "]", ", got ", FormatDouble(value)));
    }
  }

  bool Finite(absl::string_view field, double value) {
    if (std::isfinite(value)) return true;
    Fail(absl::StrCat(field, " must be a finite number, got ",
                      FormatDouble(value)));
    return false;
  }

  // Normalisation statistics: empty (the dataset's), one value for every
  // channel, or one per RGB channel.
  void Statistics(absl::string_view field, const std::vector<double>& values,
                  bool positive, double max_abs) {
    if (values.size() != 0 && values.size() != 1 && values.size() != 3) {
      Fail(absl::StrCat(field, " must have 0, 1 or 3 values, got ",
                        values.size()));
      return;
    }
    for (size_t i = 0; i < values.size(); ++i) {
      const std::string element = absl::StrCat(field, "[", i, "]");
      if (positive) {
        Greater(element, values[i], 0, max_abs);
      } else {
        InRange(element, values[i], -max_abs, false, max_abs, false);
      }
    }
  }

 private:
  static std::string Message(absl::string_view field, absl::string_view rule,
                             double bound, double value) {
    return absl::StrCat(field, " must be ", rule, FormatDouble(bound), ", got ",
                        FormatDouble(value));
  }

  std::vector<std::string> errors_;
};

// Upper bounds of the numeric fields. None is a model of what is sensible
// (that is the user's business): each is far past any real run and keeps
// every product the trainer and the coordinator make of them (steps times
// batch, dim times queue, an int32 of the API) exact, and a typo (an extra
// six zeros) from being taken for a request.
constexpr int64_t kMaxNameBytes = 128;   // a job's name; shows in every list
constexpr int64_t kMaxPathBytes = 4096;  // PATH_MAX on Linux
constexpr int64_t kMaxWidth = 4096;
constexpr int64_t kMaxDim = 65536;
constexpr int64_t kMaxQueue = int64_t{1} << 24;
constexpr int64_t kMaxImageSize = 4096;
constexpr int64_t kMaxThreads = 1024;
constexpr int64_t kMaxPrefetch = 1024;
constexpr int64_t kMaxImages = (int64_t{1} << 31) - 1;  // one int32
constexpr int64_t kMaxEpochs = 1000000;
constexpr int64_t kMaxSteps = int64_t{1} << 30;  // x kMaxBatchSize < 2^63
constexpr int64_t kMaxKeep = 1000;
constexpr int64_t kMaxRestarts = 1000;  // Job.restarts is an int32
constexpr int64_t kMaxMilestones = 64;
constexpr double kMaxSeconds = 1e8;          // about three years
constexpr double kMaxRankTimeoutS = 604800;  // a week
constexpr double kMaxTemperature = 100;
constexpr double kMaxLr = 100;
constexpr double kMaxJitter = 100;
constexpr double kMaxSigma = 100;
constexpr double kMaxStatistic = 1000;
constexpr double kMaxStragglerFactor = 1000;

void CheckFields(const JobSpec& spec, RuleChecker& check) {
  check.NotEmpty("name", spec.name);
  if (static_cast<int64_t>(spec.name.size()) > kMaxNameBytes) {
    check.Fail(absl::StrCat("name must have at most ", kMaxNameBytes,
                            " characters, got ", spec.name.size()));
  } else if (!spec.name.empty()) {
    const bool valid =
        std::all_of(spec.name.begin(), spec.name.end(), [](char c) {
          return absl::ascii_isalnum(static_cast<unsigned char>(c)) ||
                 c == '.' || c == '_' || c == '-';
        });
    if (!valid) {
      check.Fail(absl::StrCat("name must match [A-Za-z0-9._-]+, got ",
                              Quote(spec.name)));
    } else if (spec.name == "." || spec.name == "..") {
      // The name may become a path component; these two would escape it.
      check.Fail(
          absl::StrCat("name must not be . or .., got ", Quote(spec.name)));
    }
  }
  check.NotEmpty("output_dir", spec.output_dir);
  check.PathText("output_dir", spec.output_dir, kMaxPathBytes);

  const ModelSpec& model = spec.model;
  check.OneOf("model.arch", model.arch, {"resnet18", "resnet50"});
  check.Between("model.width", model.width, 1, kMaxWidth);
  check.OneOf("model.in_channels", model.in_channels, {1, 3});

  const MocoSpec& moco = spec.moco;
  check.OneOf("moco.version", moco.version, {"v1", "v2"});
  check.Between("moco.dim", moco.dim, 1, kMaxDim);
  check.Between("moco.queue_size", moco.queue_size, 1, kMaxQueue);
  check.InRange("moco.momentum", moco.momentum, 0, false, 1, false);
  check.Greater("moco.temperature", moco.temperature, 0, kMaxTemperature);
  check.OneOf("moco.bn", moco.bn, {"auto", "split", "shuffle", "none"});
  check.Between("moco.bn_groups", moco.bn_groups, 1, kMaxBatchSize);

  const DataSpec& data = spec.data;
  check.OneOf("data.format", data.format, {"fashion-mnist", "image-folder"});
  check.NotEmpty("data.path", data.path);
  check.PathText("data.path", data.path, kMaxPathBytes);
  check.Between("data.image_size", data.image_size, 0, kMaxImageSize);
  check.Between("data.loader_threads", data.loader_threads, 1, kMaxThreads);
  check.Between("data.prefetch", data.prefetch, 1, kMaxPrefetch);
  check.Between("data.limit", data.limit, 0, kMaxImages);
  check.OneOf("data.augment_on", data.augment_on, {"auto", "host", "device"});

  const AugmentSpec& augment = data.augment;
  check.InRange("data.augment.crop_min_scale", augment.crop_min_scale, 0, true,
                1, false);
  check.InRange("data.augment.crop_max_scale", augment.crop_max_scale, 0, true,
                1, false);
  check.AtLeast("data.augment.jitter_brightness", augment.jitter_brightness,
                0.0, kMaxJitter);
  check.AtLeast("data.augment.jitter_contrast", augment.jitter_contrast, 0.0,
                kMaxJitter);
  check.AtLeast("data.augment.jitter_saturation", augment.jitter_saturation,
                0.0, kMaxJitter);
  check.InRange("data.augment.jitter_hue", augment.jitter_hue, 0, false, 0.5,
                false);
  check.InRange("data.augment.jitter_prob", augment.jitter_prob, 0, false, 1,
                false);
  check.InRange("data.augment.grayscale_prob", augment.grayscale_prob, 0, false,
                1, false);
  check.InRange("data.augment.blur_prob", augment.blur_prob, 0, false, 1,
                false);
  check.Greater("data.augment.blur_sigma_min", augment.blur_sigma_min, 0,
                kMaxSigma);
  check.Greater("data.augment.blur_sigma_max", augment.blur_sigma_max, 0,
                kMaxSigma);
  check.InRange("data.augment.hflip_prob", augment.hflip_prob, 0, false, 1,
                false);
  check.Statistics("data.augment.mean", augment.mean, /*positive=*/false,
                   kMaxStatistic);
  check.Statistics("data.augment.std", augment.std, /*positive=*/true,
                   kMaxStatistic);

  const OptimSpec& optim = spec.optim;
  check.Between("optim.batch_size", optim.batch_size, 1, kMaxBatchSize);
  check.Greater("optim.lr", optim.lr, 0, kMaxLr);
  check.InRange("optim.momentum", optim.momentum, 0, false, 1, true);
  check.AtLeast("optim.weight_decay", optim.weight_decay, 0.0, 1.0);
  check.OneOf("optim.schedule", optim.schedule, {"step", "cosine", "constant"});
  check.InRange("optim.warmup", optim.warmup, 0, false, 1, true);
  const size_t milestone_errors = check.errors().size();
  if (static_cast<int64_t>(optim.milestones.size()) > kMaxMilestones) {
    check.Fail(absl::StrCat("optim.milestones must have at most ",
                            kMaxMilestones, " values, got ",
                            optim.milestones.size()));
  }
  for (size_t i = 0; i < optim.milestones.size(); ++i) {
    check.InRange(absl::StrCat("optim.milestones[", i, "]"),
                  optim.milestones[i], 0, true, 1, true);
  }
  if (check.errors().size() == milestone_errors &&
      std::adjacent_find(optim.milestones.begin(), optim.milestones.end(),
                         std::greater_equal<double>()) !=
          optim.milestones.end()) {
    check.Fail(
        absl::StrCat("optim.milestones must be strictly increasing, got ",
                     FormatList(optim.milestones)));
  }
  check.InRange("optim.gamma", optim.gamma, 0, true, 1, false);
  check.Between("optim.epochs", optim.epochs, 0, kMaxEpochs);
  check.Between("optim.steps", optim.steps, 0, kMaxSteps);
  check.AtLeast("optim.time_budget_s", optim.time_budget_s, 0.0, kMaxSeconds);

  const EvalSpec& eval = spec.eval;
  check.Between("eval.every_epochs", eval.every_epochs, 0, kMaxEpochs);
  check.Between("eval.knn_k", eval.knn_k, 1, kMaxQueue);
  check.Greater("eval.knn_temperature", eval.knn_temperature, 0,
                kMaxTemperature);
  check.Between("eval.batch_size", eval.batch_size, 1, kMaxBatchSize);
  check.Between("eval.max_train", eval.max_train, 0, kMaxImages);
  check.Between("eval.max_test", eval.max_test, 0, kMaxImages);

  const CheckpointSpec& checkpoint = spec.checkpoint;
  check.Between("checkpoint.every_steps", checkpoint.every_steps, 0, kMaxSteps);
  check.Between("checkpoint.every_epochs", checkpoint.every_epochs, 0,
                kMaxEpochs);
  check.Between("checkpoint.keep", checkpoint.keep, 1, kMaxKeep);

  check.Between("logging.every_steps", spec.logging.every_steps, 1, kMaxSteps);

  const ResourcesSpec& resources = spec.resources;
  check.Between("resources.threads", resources.threads, 0, kMaxThreads);
  // Past any real cluster; the bound keeps sizes exact in every int32 of
  // the API and a typo from queueing a job that can never start.
  check.Between("resources.nproc", resources.nproc, 1, kMaxRanks);
  check.OneOf("resources.backend", resources.backend, {"auto", "gloo", "nccl"});
  check.OneOf("resources.device", resources.device, {"auto", "cpu", "cuda"});
  check.OneOf("resources.precision", resources.precision, {"fp32", "bf16"});
  check.OneOf("resources.cpu_affinity", resources.cpu_affinity,
              {"auto", "none"});
  check.Greater("resources.timeout_s", resources.timeout_s, 0,
                kMaxRankTimeoutS);

  check.InRange("scheduling.priority",
                static_cast<double>(spec.scheduling.priority), -1000, false,
                1000, false);
  check.Between("scheduling.max_restarts", spec.scheduling.max_restarts, 0,
                kMaxRestarts);
  check.InRange("scheduling.restart_backoff_s",
                spec.scheduling.restart_backoff_s, 0, false, 3600, false);
  check.AtLeast("scheduling.hang_timeout_s", spec.scheduling.hang_timeout_s,
                0.0, kMaxRankTimeoutS);
  if (spec.scheduling.straggler_factor != 0) {
    check.AtLeast("scheduling.straggler_factor",
                  spec.scheduling.straggler_factor, 1.0, kMaxStragglerFactor);
  }
  check.OneOf("faults.on_nonfinite", spec.faults.on_nonfinite,
              {"rollback", "fail"});
  check.OneOf("faults.on_collapse", spec.faults.on_collapse,
              {"rollback", "fail"});
  check.InRange("faults.collapse_std_ratio", spec.faults.collapse_std_ratio, 0,
                false, 1, true);
  check.Between("faults.collapse_patience", spec.faults.collapse_patience, 1,
                kMaxSteps);
  check.InRange("faults.rollback_lr_factor", spec.faults.rollback_lr_factor, 0,
                true, 1, false);
  check.Between("faults.max_rollbacks", spec.faults.max_rollbacks, 0,
                kMaxRestarts);
}

// Rules across fields; they assume every field passed CheckFields (no
// division by a zero nproc, no NaN).
void CheckAcrossFields(const JobSpec& spec, RuleChecker& check) {
  const AugmentSpec& augment = spec.data.augment;
  if (augment.crop_min_scale > augment.crop_max_scale) {
    check.Fail(absl::StrCat(
        "data.augment.crop_min_scale must be <= data.augment.crop_max_scale, "
        "got ",
        FormatDouble(augment.crop_min_scale), " and ",
        FormatDouble(augment.crop_max_scale)));
  }
  if (augment.blur_sigma_min > augment.blur_sigma_max) {
    check.Fail(absl::StrCat(
        "data.augment.blur_sigma_min must be <= data.augment.blur_sigma_max, "
        "got ",
        FormatDouble(augment.blur_sigma_min), " and ",
        FormatDouble(augment.blur_sigma_max)));
  }

  const OptimSpec& optim = spec.optim;
  if (optim.epochs == 0 && optim.steps == 0 && optim.time_budget_s == 0) {
    check.Fail("optim: set at least one of epochs, steps, time_budget_s");
  }

  const int64_t nproc = spec.resources.nproc;
  if (optim.batch_size % nproc != 0) {
    check.Fail(absl::StrCat(
        "optim.batch_size must be divisible by resources.nproc, got ",
        optim.batch_size, " and ", nproc));
  } else {
    // "auto" means split BN when there is one rank (see MocoSpec::bn).
    const bool split =
        spec.moco.bn == "split" || (spec.moco.bn == "auto" && nproc == 1);
    const int64_t per_rank = optim.batch_size / nproc;
    if (split && per_rank % spec.moco.bn_groups != 0) {
      check.Fail(absl::StrCat(
          "moco.bn_groups must divide the per-rank batch optim.batch_size / "
          "resources.nproc for split BN, got ",
          spec.moco.bn_groups, " and ", optim.batch_size, " / ", nproc));
    }
  }

  if (spec.eval.max_train > 0 && spec.eval.knn_k > spec.eval.max_train) {
    check.Fail(absl::StrCat(
        "eval.knn_k must be <= eval.max_train when max_train is set, got ",
        spec.eval.knn_k, " and ", spec.eval.max_train));
  }

  if (spec.resources.backend == "nccl" && spec.resources.device == "cpu") {
    check.Fail(absl::StrCat(
        "resources.backend nccl requires resources.device cuda or auto, got ",
        Quote(spec.resources.device)));
  }
}

// ---------------------------------------------------------------------------
// JobSpec -> YAML.

// Strings that would read back as something else than the same string (null,
// a boolean, a number) or as nothing are double-quoted; the emitter quotes
// the ones that YAML syntax requires by itself.
bool NeedsQuotes(const std::string& text) {
  static constexpr absl::string_view kWords[] = {
      "~",     "null", "Null", "NULL", "true", "True", "TRUE", "false", "False",
      "FALSE", "yes",  "Yes",  "YES",  "no",   "No",   "NO",   "on",    "On",
      "ON",    "off",  "Off",  "OFF",  "y",    "Y",    "n",    "N"};
  if (text.empty()) return true;
  if (std::find(std::begin(kWords), std::end(kWords), text) !=
      std::end(kWords)) {
    return true;
  }
  double number = 0;
  return absl::SimpleAtod(text, &number);
}

class YamlWriter {
 public:
  explicit YamlWriter(YAML::Emitter* out) : out_(out) {}

  void operator()(std::string* value) {
    if (NeedsQuotes(*value)) *out_ << YAML::DoubleQuoted;
    *out_ << *value;
  }
  void operator()(int64_t* value) { *out_ << absl::StrCat(*value); }
  void operator()(uint64_t* value) { *out_ << absl::StrCat(*value); }
  void operator()(double* value) { *out_ << FormatDouble(*value); }
  void operator()(bool* value) { *out_ << (*value ? "true" : "false"); }
  void operator()(std::vector<double>* values) {
    *out_ << YAML::Flow << YAML::BeginSeq;
    for (double value : *values) *out_ << FormatDouble(value);
    *out_ << YAML::EndSeq;
  }

 private:
  YAML::Emitter* out_;
};

}  // namespace

absl::StatusOr<JobSpec> ParseJobSpec(const std::string& yaml_text,
                                     const std::vector<std::string>& overrides,
                                     const std::string& source) {
  auto invalid = [&source](absl::string_view message) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": ", message));
  };

  // YAML::LoadAll of yaml-cpp 0.7 loops forever on some malformed input
  // (found by tests/fuzz): count the documents with a capped loop of the
  // parser instead, then load the first.
  std::vector<YAML::Node> documents;
  try {
    std::stringstream in(yaml_text);
    YAML::Parser parser(in);
    NullEventHandler ignore;
    int64_t count = 0;
    while (count < 2 && parser.HandleNextDocument(ignore)) ++count;
    if (count > 1) {
      return invalid("expected one YAML document, got more than one");
    }
    if (count == 1) documents.push_back(YAML::Load(yaml_text));
  } catch (const YAML::ParserException& e) {
    if (e.mark.is_null()) {
      return invalid(absl::StrCat("YAML syntax error: ", e.msg));
    }
    return invalid(absl::StrCat("YAML syntax error at line ", e.mark.line + 1,
                                ", column ", e.mark.column + 1, ": ", e.msg));
  }
  YAML::Node root =
      documents.empty() ? YAML::Node(YAML::NodeType::Null) : documents[0];
  if (!root.IsNull() && !root.IsMap()) {
    return invalid(absl::StrCat("the job spec must be a map of fields, got ",
                                Describe(root)));
  }

  for (const std::string& override_text : overrides) {
    const absl::Status status = ApplyOverride(root, override_text);
    if (!status.ok()) return invalid(status.message());
  }

  JobSpec spec;
  std::set<std::string> set_paths;
  std::vector<std::string> errors;
  if (root.IsMap()) {
    TreeReader(&spec, &set_paths, &errors).ReadSection(root, "");
  }
  if (!errors.empty()) return invalid(absl::StrJoin(errors, "; "));

  if (spec.moco.version == "v1" || spec.moco.version == "v2") {
    ApplyVersionDefaults(set_paths, &spec);
  }
  const absl::Status status = ValidateJobSpec(spec);
  if (!status.ok()) return invalid(status.message());
  return spec;
}

absl::StatusOr<JobSpec> LoadJobSpecFile(
    const std::string& path, const std::vector<std::string>& overrides) {
  MOMENTUM_ASSIGN_OR_RETURN(const std::string text, ReadWholeFile(path));
  return ParseJobSpec(text, overrides, path);
}

std::string JobSpecToYaml(const JobSpec& spec) {
  // The field table hands out mutable pointers; a copy keeps `spec` const.
  JobSpec copy = spec;
  YAML::Emitter out;
  out << YAML::BeginMap;
  std::vector<std::string> open;  // the sections now open, outermost first
  for (const Field& field : kFields) {
    std::vector<std::string> parts = absl::StrSplit(field.path, '.');
    const std::string key = parts.back();
    parts.pop_back();
    size_t shared = 0;
    while (shared < open.size() && shared < parts.size() &&
           open[shared] == parts[shared]) {
      ++shared;
    }
    for (; open.size() > shared; open.pop_back()) out << YAML::EndMap;
    for (; open.size() < parts.size(); open.push_back(parts[open.size()])) {
      out << YAML::Key << parts[open.size()] << YAML::Value << YAML::BeginMap;
    }
    out << YAML::Key << key << YAML::Value;
    std::visit(YamlWriter(&out), field.get(copy));
  }
  for (; !open.empty(); open.pop_back()) out << YAML::EndMap;
  out << YAML::EndMap;
  return absl::StrCat(out.c_str(), "\n");
}

absl::Status ValidateJobSpec(const JobSpec& spec) {
  RuleChecker check;
  CheckFields(spec, check);
  if (check.errors().empty()) CheckAcrossFields(spec, check);
  if (check.errors().empty()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrJoin(check.errors(), "; "));
}

}  // namespace momentum
