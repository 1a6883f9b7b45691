#include "worker/log.h"

#include <spdlog/spdlog.h>

namespace momentum::worker {

void SetupLog(bool quiet) {
  spdlog::set_pattern("[%H:%M:%S] %v");
  spdlog::flush_on(spdlog::level::info);  // progress reaches pipes at once
  spdlog::set_level(quiet ? spdlog::level::warn : spdlog::level::info);
}

void LogInfoLine(std::string_view message) { spdlog::info("{}", message); }

void LogWarnLine(std::string_view message) { spdlog::warn("{}", message); }

}  // namespace momentum::worker
