#include "server/job_logs.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace momentum::server {
namespace {

namespace fs = std::filesystem;

bool WriteAll(int fd, const char* data, size_t size) {
  while (size > 0) {
    const ssize_t n = ::write(fd, data, size);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    data += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

int64_t CountLines(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  int64_t n = 0;
  char buf[1 << 16];
  while (in.read(buf, sizeof(buf)) || in.gcount() > 0) {
    n += std::count(buf, buf + in.gcount(), '\n');
  }
  return n;
}

}  // namespace

JobLogs::~JobLogs() {
  absl::MutexLock lock(&mu_);
  for (auto& [key, file] : files_) ::close(file.fd);
}

std::string JobLogs::PathOf(const std::string& job_id, int64_t rank) const {
  return (fs::path(jobs_dir_) / job_id / "logs" /
          absl::StrCat("rank-", rank, ".log"))
      .string();
}

absl::StatusOr<std::vector<int64_t>> JobLogs::Append(const std::string& job_id,
                                                     int64_t rank,
                                                     const std::string& line) {
  if (!IsJobId(job_id)) {
    return absl::InvalidArgumentError(
        absl::StrCat("\"", job_id.substr(0, 64), "\" is not a job id"));
  }
  if (rank < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("rank must be >= 0, got ", rank));
  }
  absl::MutexLock lock(&mu_);
  File& file = files_[{job_id, rank}];
  if (file.fd < 0) {
    const std::string path = PathOf(job_id, rank);
    std::error_code ec;
    fs::create_directories(fs::path(path).parent_path(), ec);
    // Lines of earlier attempts (and coordinators) count.
    file.lines = CountLines(path);
    file.fd =
        ::open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (file.fd < 0) {
      const int err = errno;
      files_.erase({job_id, rank});
      return absl::InternalError(
          absl::StrCat("opening ", path, ": ", std::strerror(err)));
    }
  }
  std::vector<int64_t> numbers;
  size_t start = 0;
  do {
    const size_t n = std::min(kMaxLineBytes, line.size() - start);
    std::string piece = line.substr(start, n);
    piece.push_back('\n');
    if (!WriteAll(file.fd, piece.data(), piece.size())) {
      return absl::InternalError(absl::StrCat("writing ", PathOf(job_id, rank),
                                              ": ", std::strerror(errno)));
    }
    numbers.push_back(++file.lines);
    start += n;
  } while (start < line.size());
  return numbers;
}

void JobLogs::CloseJob(const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  for (auto it = files_.lower_bound({job_id, 0});
       it != files_.end() && it->first.first == job_id;) {
    ::close(it->second.fd);
    it = files_.erase(it);
  }
}

size_t JobLogs::open_files() const {
  absl::MutexLock lock(&mu_);
  return files_.size();
}

absl::StatusOr<std::vector<v1::LogLine>> JobLogs::Read(
    const std::string& job_id, int64_t rank, int64_t from_line) const {
  if (!IsJobId(job_id)) {
    return absl::InvalidArgumentError(
        absl::StrCat("\"", job_id.substr(0, 64), "\" is not a job id"));
  }
  // The ranks that wrote something, in order.
  std::vector<int64_t> ranks;
  std::error_code ec;
  for (const auto& entry :
       fs::directory_iterator(fs::path(jobs_dir_) / job_id / "logs", ec)) {
    const std::string name = entry.path().filename().string();
    int64_t r = -1;
    if (name.rfind("rank-", 0) == 0 && entry.path().extension() == ".log" &&
        absl::SimpleAtoi(name.substr(5, name.size() - 9), &r) && r >= 0 &&
        (rank < 0 || r == rank)) {
      ranks.push_back(r);
    }
  }
  std::sort(ranks.begin(), ranks.end());
  std::vector<v1::LogLine> lines;
  for (int64_t r : ranks) {
    std::ifstream in(PathOf(job_id, r));
    std::string text;
    int64_t n = 0;
    while (std::getline(in, text)) {
      ++n;
      if (n < from_line) continue;
      v1::LogLine line;
      line.set_rank(static_cast<int32_t>(r));
      line.set_line_number(n);
      line.set_text(text);
      lines.push_back(std::move(line));
    }
  }
  return lines;
}

std::string JobLogs::LastLine(const std::string& job_id, int64_t rank,
                              size_t max_bytes) const {
  if (!IsJobId(job_id)) return "";
  std::ifstream in(PathOf(job_id, rank), std::ios::binary | std::ios::ate);
  if (!in) return "";
  // The tail is enough: lines are at most kMaxLineBytes.
  const std::streamoff size = in.tellg();
  const std::streamoff from = std::max<std::streamoff>(
      0, size - static_cast<std::streamoff>(kMaxLineBytes + 1));
  in.seekg(from);
  std::string tail(static_cast<size_t>(size - from), '\0');
  in.read(tail.data(), static_cast<std::streamsize>(tail.size()));
  while (!tail.empty() && (tail.back() == '\n' || tail.back() == '\r')) {
    tail.pop_back();
  }
  const size_t nl = tail.rfind('\n');
  std::string last = nl == std::string::npos ? tail : tail.substr(nl + 1);
  if (last.size() > max_bytes) {
    last = "..." + last.substr(last.size() - max_bytes);
  }
  return last;
}

}  // namespace momentum::server
