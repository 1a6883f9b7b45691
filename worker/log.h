// The worker's log lines: "[HH:MM:SS] message" on stderr, flushed at once so
// that progress reaches the coordinator's pipes as it happens.
//
//   LogInfo("resuming from %s at step %d", path, step);
//   LogWarn("skipping checkpoint %s: %s", path, status.message());
//
// spdlog writes them, behind this header: Debian's spdlog is built against
// Debian's fmt 9, while LibTorch 2.x ships fmt 12 in its include folder,
// which comes first in every translation unit that sees LibTorch. So no
// LibTorch unit includes spdlog; log.cc, in a library without LibTorch,
// does. Formatting is absl::StrFormat's (printf-style, type-checked).
#ifndef MOMENTUM_WORKER_LOG_H_
#define MOMENTUM_WORKER_LOG_H_

#include <string_view>

#include "absl/strings/str_format.h"

namespace momentum::worker {

// Sets the line format; with `quiet`, only warnings are written (the ranks
// other than 0 of a group). Call once, before the first line.
void SetupLog(bool quiet);

void LogInfoLine(std::string_view message);
void LogWarnLine(std::string_view message);

template <typename... Args>
void LogInfo(const absl::FormatSpec<Args...>& format, const Args&... args) {
  LogInfoLine(absl::StrFormat(format, args...));
}

template <typename... Args>
void LogWarn(const absl::FormatSpec<Args...>& format, const Args&... args) {
  LogWarnLine(absl::StrFormat(format, args...));
}

}  // namespace momentum::worker

#endif  // MOMENTUM_WORKER_LOG_H_
