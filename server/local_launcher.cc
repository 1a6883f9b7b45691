#include "server/local_launcher.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "common/exit_codes.h"
#include "common/process.h"
#include "server/gpus.h"

namespace momentum::server {
namespace {

namespace fs = std::filesystem;

// Field 22 of /proc/<pid>/stat: when the process started, in clock ticks
// since boot; 0 when there is no such process.
uint64_t StartTime(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(in, line)) return 0;
  const size_t close = line.rfind(')');
  if (close == std::string::npos) return 0;
  std::istringstream rest(line.substr(close + 2));
  std::string field;
  // Fields 3..21 precede the start time.
  for (int i = 3; i <= 21 && rest >> field; ++i) {
  }
  uint64_t start = 0;
  rest >> start;
  return start;
}

// Processes whose working directory `where` accepts (an attempt's folder,
// <work_dir>/<job_id>/attempt-<n>) and whose environment says they are
// ranks of the job that folder is in (MOMENTUM_JOB_ID=<job_id>): the ranks
// started there, pid file or not (a coordinator killed between a spawn and
// the pid file's write leaves none), and what they started.
std::vector<pid_t> RanksWorkingIn(
    const std::function<bool(const fs::path&)>& where) {
  std::vector<pid_t> found;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator("/proc", ec)) {
    const std::string name = entry.path().filename().string();
    if (name.empty() ||
        name.find_first_not_of("0123456789") != std::string::npos) {
      continue;
    }
    std::error_code link_ec;
    const fs::path cwd = fs::read_symlink(entry.path() / "cwd", link_ec);
    if (link_ec || !where(cwd)) continue;
    const std::string marker =
        "MOMENTUM_JOB_ID=" + cwd.parent_path().filename().string();
    std::ifstream in(entry.path() / "environ", std::ios::binary);
    std::string var;
    bool ours = false;
    while (std::getline(in, var, '\0')) {
      if (var == marker) {
        ours = true;
        break;
      }
    }
    if (ours) found.push_back(static_cast<pid_t>(std::stol(name)));
  }
  return found;
}

// SIGTERM to each of `alive` (pid, start time) not yet signalled, SIGKILL
// to those left after `grace_seconds`; returns once all are gone. A pid
// whose start time changed is another process and is left alone.
void StopAndWait(const std::vector<std::pair<pid_t, uint64_t>>& alive,
                 double grace_seconds) {
  auto gone = [&] {
    for (const auto& [pid, start] : alive) {
      if (StartTime(pid) == start) return false;
    }
    return true;
  };
  const auto deadline =
      std::chrono::steady_clock::now() +
      std::chrono::duration_cast<std::chrono::steady_clock::duration>(
          std::chrono::duration<double>(grace_seconds));
  while (!gone() && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  for (const auto& [pid, start] : alive) {
    if (StartTime(pid) == start && ::kill(-pid, SIGKILL) != 0) {
      ::kill(pid, SIGKILL);
    }
  }
  // A killed orphan is reaped by init at once; a zombie still counts as
  // present in /proc until then.
  for (int i = 0; i < 100 && !gone(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

// Adds `pid` to `alive` and sends it SIGTERM (its process group when it
// leads one), unless it is there already or gone.
void Terminate(pid_t pid, std::vector<std::pair<pid_t, uint64_t>>* alive) {
  for (const auto& a : *alive) {
    if (a.first == pid) return;
  }
  const uint64_t start = StartTime(pid);
  if (start == 0) return;
  alive->emplace_back(pid, start);
  if (::kill(-pid, SIGTERM) != 0) ::kill(pid, SIGTERM);
}

std::string PidFile(const fs::path& dir, int64_t rank) {
  return (dir / absl::StrCat("rank-", rank, ".pid")).string();
}

// OK when the request gives every rank a GPU this launcher offers, or none
// to all of them (a CPU job).
absl::Status CheckRequestGpus(const LaunchRequest& request,
                              const std::vector<int>& offered) {
  if (request.gpus.empty()) return absl::OkStatus();
  if (request.gpus.size() != request.ranks.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("the launch gives ", request.gpus.size(), " GPUs to ",
                     request.ranks.size(), " ranks"));
  }
  for (int gpu : request.gpus) {
    if (std::find(offered.begin(), offered.end(), gpu) == offered.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("GPU ", gpu, " is not one this launcher offers (",
                       GpuList(offered), ")"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

LocalLauncher::LocalLauncher(std::string worker_binary, int64_t slots,
                             std::vector<int> gpus, std::string work_dir,
                             LaunchEvents* events)
    : worker_binary_(std::move(worker_binary)),
      slots_(slots),
      gpus_(std::move(gpus)),
      work_dir_(std::move(work_dir)),
      events_(events) {}

LocalLauncher::~LocalLauncher() {
  std::vector<Thread> threads;
  {
    absl::MutexLock lock(&mu_);
    shutting_down_ = true;
    for (const auto& p : processes_) {
      if (p->running) ::kill(-p->pid, SIGKILL);
    }
    shutdown_cv_.SignalAll();
    threads.swap(threads_);
  }
  for (Thread& t : threads) t.thread.join();
}

bool LocalLauncher::RunningLocked(const std::string* job_id,
                                  int64_t attempt) const {
  for (const auto& p : processes_) {
    if (p->running && (job_id == nullptr ||
                       (p->job_id == *job_id && p->attempt == attempt))) {
      return true;
    }
  }
  return false;
}

template <typename Fn>
void LocalLauncher::StartThreadLocked(Fn fn) {
  std::vector<Thread> alive;
  for (Thread& t : threads_) {
    if (t.done->load()) {
      t.thread.join();
    } else {
      alive.push_back(std::move(t));
    }
  }
  threads_ = std::move(alive);
  std::vector<std::shared_ptr<Process>> running;
  for (auto& p : processes_) {
    if (p->running) running.push_back(p);
  }
  processes_ = std::move(running);
  auto done = std::make_shared<std::atomic<bool>>(false);
  threads_.push_back({std::thread([fn = std::move(fn), done] {
                        fn();
                        done->store(true);
                      }),
                      done});
}

absl::Status LocalLauncher::Launch(const LaunchRequest& request) {
  if (absl::Status s = CheckRequestGpus(request, gpus_); !s.ok()) return s;
  const fs::path dir = fs::path(work_dir_) / request.job_id /
                       absl::StrCat("attempt-", request.attempt);
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) {
    return absl::InternalError(
        absl::StrCat("creating ", dir.string(), ": ", ec.message()));
  }
  const fs::path spec_path = dir / "spec.yaml";
  {
    std::ofstream out(spec_path);
    out << request.spec_yaml;
    out.close();
    if (!out) {
      return absl::InternalError(
          absl::StrCat("writing ", spec_path.string(), " failed"));
    }
  }
  const int64_t local_world = static_cast<int64_t>(request.ranks.size());
  for (size_t i = 0; i < request.ranks.size(); ++i) {
    const int64_t rank = request.ranks[i];
    SpawnOptions options;
    options.argv = {worker_binary_, "--config", spec_path.string()};
    if (!request.output_dir.empty()) {
      options.argv.insert(options.argv.end(),
                          {"--output-dir", request.output_dir});
    }
    // The rank's one GPU, which it sees as device 0; a CPU rank sees none.
    RankPlace place;
    place.rank = rank;
    place.local_rank = static_cast<int64_t>(i);
    place.world_size = request.world_size;
    place.local_world_size = local_world;
    place.master_addr = request.master_addr;
    place.master_port = request.master_port;
    place.cuda_visible_devices =
        request.gpus.empty() ? "" : absl::StrCat(request.gpus[i]);
    // The launcher's own secrets (tokens, keys, cloud credentials) stay
    // here: a rank gets the allow-list and what the request gives it.
    place.inherit_all = false;
    // The request's variables come first, so that an agent that launches a
    // machine's ranks one by one can give their LOCAL_RANK and
    // LOCAL_WORLD_SIZE.
    std::vector<std::string> extra = request.env;
    if (i < request.credentials.size()) {
      extra.push_back("MOMENTUM_TOKEN=" + request.credentials[i]);
    }
    options.env = RankEnvironment(place, extra);
    options.cwd = dir.string();
    options.new_process_group = true;

    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) {
      const std::string why = absl::StrCat("pipe: ", std::strerror(errno));
      events_->OnRankExited(request.job_id, request.attempt, rank, kExitFailed,
                            0, "could not be started: " + why);
      continue;
    }
    options.output_fd = fds[1];
    absl::StatusOr<pid_t> pid = Spawn(options);
    ::close(fds[1]);
    if (!pid.ok()) {
      ::close(fds[0]);
      // No such binary, or not executable: every attempt would fail alike.
      const bool permanent = absl::IsNotFound(pid.status()) ||
                             absl::IsPermissionDenied(pid.status());
      events_->OnRankExited(
          request.job_id, request.attempt, rank,
          permanent ? kExitBadInput : kExitFailed, 0,
          absl::StrCat("could not be started: ", pid.status().message()));
      continue;
    }
    // Who runs, for a coordinator that comes after a crash of this one.
    std::ofstream(PidFile(dir, rank)) << *pid << " " << StartTime(*pid) << "\n";
    auto process = std::make_shared<Process>();
    process->pid_file = PidFile(dir, rank);
    process->job_id = request.job_id;
    process->attempt = request.attempt;
    process->rank = rank;
    process->pid = *pid;
    absl::MutexLock lock(&mu_);
    processes_.push_back(process);
    const int read_fd = fds[0];
    StartThreadLocked(
        [this, process, read_fd] { Supervise(process, read_fd); });
  }
  return absl::OkStatus();
}

void LocalLauncher::Supervise(std::shared_ptr<Process> process, int read_fd) {
  // Lines until every holder of the pipe's write end (the rank and anything
  // it started) has closed it.
  std::string pending;
  char buf[4096];
  while (true) {
    const ssize_t n = ::read(read_fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    const char* begin = buf;
    const char* const end = buf + n;
    // Each byte is looked at once, and a line without its newline is cut
    // at kMaxOutputLineBytes: memory stays bounded whatever the rank writes.
    while (begin < end) {
      const char* nl = static_cast<const char*>(
          std::memchr(begin, '\n', static_cast<size_t>(end - begin)));
      const char* stop = nl != nullptr ? nl : end;
      const size_t room = kMaxOutputLineBytes - pending.size();
      if (static_cast<size_t>(stop - begin) > room) {
        pending.append(begin, room);
        events_->OnRankOutput(process->job_id, process->attempt, process->rank,
                              pending);
        pending.clear();
        begin += room;
        continue;
      }
      pending.append(begin, stop);
      if (nl == nullptr) break;
      events_->OnRankOutput(process->job_id, process->attempt, process->rank,
                            pending);
      pending.clear();
      begin = nl + 1;
    }
  }
  if (!pending.empty()) {
    events_->OnRankOutput(process->job_id, process->attempt, process->rank,
                          pending);
  }
  ::close(read_fd);
  int status = 0;
  pid_t got;
  do {
    got = ::waitpid(process->pid, &status, 0);
  } while (got < 0 && errno == EINTR);
  {
    absl::MutexLock lock(&mu_);
    process->running = false;
  }
  std::error_code ec;
  fs::remove(process->pid_file, ec);
  if (got < 0) {
    events_->OnRankExited(process->job_id, process->attempt, process->rank, 1,
                          0, "ended, but its exit status was lost");
    return;
  }
  const bool signaled = WIFSIGNALED(status);
  events_->OnRankExited(process->job_id, process->attempt, process->rank,
                        signaled ? -1 : WEXITSTATUS(status),
                        signaled ? WTERMSIG(status) : 0,
                        DescribeWaitStatus(status));
}

void LocalLauncher::Stop(const std::string& job_id, int64_t attempt,
                         double grace_seconds) {
  absl::MutexLock lock(&mu_);
  bool any = false;
  for (const auto& p : processes_) {
    if (p->running && p->job_id == job_id && p->attempt == attempt) {
      ::kill(-p->pid, SIGTERM);
      any = true;
    }
  }
  if (any && !shutting_down_) {
    StartThreadLocked([this, job_id, attempt, grace_seconds] {
      KillAfter(job_id, attempt, grace_seconds);
    });
  }
}

void LocalLauncher::StopAll(double grace_seconds) {
  absl::MutexLock lock(&mu_);
  for (const auto& p : processes_) {
    if (p->running) ::kill(-p->pid, SIGTERM);
  }
  const absl::Time deadline = absl::Now() + absl::Seconds(grace_seconds);
  while (RunningLocked(nullptr, 0) && absl::Now() < deadline) {
    shutdown_cv_.WaitWithTimeout(&mu_, absl::Milliseconds(100));
  }
  for (const auto& p : processes_) {
    if (p->running) ::kill(-p->pid, SIGKILL);
  }
  // Their exits are noted by the waiting threads.
  while (RunningLocked(nullptr, 0)) {
    shutdown_cv_.WaitWithTimeout(&mu_, absl::Milliseconds(50));
  }
}

void LocalLauncher::KillAfter(std::string job_id, int64_t attempt,
                              double grace_seconds) {
  absl::MutexLock lock(&mu_);
  const absl::Time deadline = absl::Now() + absl::Seconds(grace_seconds);
  // Woken only by shutdown; polls the ranks a few times a second.
  while (!shutting_down_ && RunningLocked(&job_id, attempt) &&
         absl::Now() < deadline) {
    shutdown_cv_.WaitWithTimeout(&mu_, absl::Milliseconds(100));
  }
  for (const auto& p : processes_) {
    if (p->running && p->job_id == job_id && p->attempt == attempt) {
      ::kill(-p->pid, SIGKILL);
    }
  }
}

int LocalLauncher::StopLeftovers(const std::string& job_id, int64_t attempt,
                                 double grace_seconds) {
  return StopLeftoverRanks(
      (fs::path(work_dir_) / job_id / absl::StrCat("attempt-", attempt))
          .string(),
      grace_seconds);
}

int LocalLauncher::StopLeftoverRanks(const std::string& attempt_dir,
                                     double grace_seconds) {
  std::vector<std::pair<pid_t, uint64_t>> alive;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(attempt_dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind("rank-", 0) != 0 || entry.path().extension() != ".pid") {
      continue;
    }
    std::ifstream in(entry.path());
    pid_t pid = 0;
    uint64_t start = 0;
    if (in >> pid >> start && pid > 0 && start != 0 &&
        StartTime(pid) == start) {
      alive.emplace_back(pid, start);
      ::kill(-pid, SIGTERM);
    }
  }
  // Ranks without a pid file, found by where they run.
  const fs::path dir = fs::canonical(attempt_dir, ec);
  if (!ec) {
    for (pid_t pid :
         RanksWorkingIn([&](const fs::path& cwd) { return cwd == dir; })) {
      Terminate(pid, &alive);
    }
  }
  StopAndWait(alive, grace_seconds);
  return static_cast<int>(alive.size());
}

int LocalLauncher::StopEveryLeftover(double grace_seconds) {
  std::error_code ec;
  const fs::path root = fs::canonical(work_dir_, ec);
  if (ec) return 0;
  std::vector<std::pair<pid_t, uint64_t>> alive;
  for (pid_t pid : RanksWorkingIn([&](const fs::path& cwd) {
         return cwd.parent_path().parent_path() == root &&
                cwd.filename().string().rfind("attempt-", 0) == 0;
       })) {
    Terminate(pid, &alive);
  }
  StopAndWait(alive, grace_seconds);
  return static_cast<int>(alive.size());
}

std::vector<pid_t> LocalLauncher::RunningPids() const {
  absl::MutexLock lock(&mu_);
  std::vector<pid_t> pids;
  for (const auto& p : processes_) {
    if (p->running) pids.push_back(p->pid);
  }
  return pids;
}

}  // namespace momentum::server
