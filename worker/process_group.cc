#include "worker/process_group.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/distributed/c10d/exception.h>
#include <torch/version.h>

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#ifdef MOMENTUM_WITH_CUDA
#include <c10/cuda/CUDAFunctions.h>

#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <cstdlib>
#include <exception>
#include <limits>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace momentum::worker {
namespace {

// The collectives live on c10d::ProcessGroup in LibTorch 1.x and on the
// c10d::Backend that a ProcessGroup wraps in 2.x; ProcessGroupGloo and
// ProcessGroupNCCL derive from the one of their version.
#if TORCH_VERSION_MAJOR >= 2
using CollectiveBackend = c10d::Backend;
#else
using CollectiveBackend = c10d::ProcessGroup;
#endif

// ---- environment ----

absl::StatusOr<std::string> RequiredEnv(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr) {
    return absl::NotFoundError(
        absl::StrCat("environment variable ", name,
                     " is not set (torchrun sets RANK, WORLD_SIZE, "
                     "MASTER_ADDR and MASTER_PORT)"));
  }
  return std::string(value);
}

// Parses `text` as an integer in [lo, hi]; `rule` words the range for the
// message, as in "RANK must be an integer in [0, WORLD_SIZE), got "x"".
absl::StatusOr<int64_t> ParseEnvInt(const char* name, const std::string& text,
                                    int64_t lo, int64_t hi,
                                    absl::string_view rule) {
  int64_t value = 0;
  if (!absl::SimpleAtoi(text, &value) || value < lo || value > hi) {
    return absl::InvalidArgumentError(absl::StrCat(
        name, " must be an integer ", rule, ", got \"", text, "\""));
  }
  return value;
}

// ---- errors ----

bool LooksLikeTimeout(absl::string_view message) {
  const std::string lower = absl::AsciiStrToLower(message);
  return absl::StrContains(lower, "timed out") ||
         absl::StrContains(lower, "timeout") ||
         absl::StrContains(lower, "time out");
}

// Turns what c10d, gloo or the store threw into a Status: DEADLINE_EXCEEDED
// for a timeout (c10d::TimeoutError, or gloo's and the store's messages,
// which are plain exceptions that say "Timed out" / "Socket Timeout"),
// UNAVAILABLE for everything else (a peer that closed its connection, a
// refused bind).
absl::Status StatusFromException(std::exception_ptr error,
                                 absl::string_view context) {
  std::string message;
  bool timeout = false;
  try {
    std::rethrow_exception(error);
  } catch (const c10d::TimeoutError& e) {
    message = e.what();
    timeout = true;
  } catch (const c10::Error& e) {
    message = e.what_without_backtrace();
  } catch (const std::exception& e) {
    message = e.what();
  } catch (...) {
    message = "unknown exception";
  }
  absl::StripTrailingAsciiWhitespace(&message);
  timeout = timeout || LooksLikeTimeout(message);
  std::string text = absl::StrCat(context, ": ", message);
  return timeout ? absl::DeadlineExceededError(text)
                 : absl::UnavailableError(text);
}

// ---- backend ----

bool IsLoopback(const std::string& host) {
  return absl::StartsWith(host, "127.") || host == "localhost" || host == "::1";
}

// Where `options.backend` keeps its tensors: the rank's GPU for NCCL.
at::Device BackendDevice(const DistOptions& options) {
  if (options.backend != "nccl") return at::Device(at::kCPU);
  return at::Device(at::kCUDA,
                    static_cast<c10::DeviceIndex>(options.cuda_device >= 0
                                                      ? options.cuda_device
                                                      : options.local_rank));
}

// The one place that knows the backends: builds `options.backend` for this
// rank over `store`, blocking until every rank has joined. Throws what c10d
// throws.
c10::intrusive_ptr<CollectiveBackend> MakeBackend(
    const DistOptions& options, const c10::intrusive_ptr<c10d::Store>& store,
    const std::string& host) {
  const int rank = static_cast<int>(options.rank);
  const int size = static_cast<int>(options.world_size);
#ifdef MOMENTUM_WITH_CUDA
  if (options.backend == "nccl") {
    // What a hang looks like on NCCL (LibTorch 2.x): a collective whose peer
    // never joins does not throw from Work::wait in time. The group's
    // watchdog thread sees it run past `options.timeout`, aborts the
    // communicators and ends the process with SIGABRT (error handling mode
    // 3, SkipCleanUp, the 2.11 default, set here explicitly so that a user's
    // environment cannot turn it into a silent hang: 0 would leave the rank
    // waiting forever). The coordinator then sees the waiting ranks die on a
    // signal and restarts the gang from the newest checkpoint; a rank that
    // is itself stuck (SIGSTOP) is named by the coordinator's hang timeout.
    ::setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3", /*overwrite=*/1);
    // One GPU per rank (worker/device.h picks it); the trainer's tensors
    // live there.
    const at::Device device = BackendDevice(options);
    c10::cuda::set_device(device.index());
    auto nccl = c10d::ProcessGroupNCCL::Options::create();
    nccl->timeout = options.timeout;
    auto group =
        c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, size, nccl);
    // Bound to its device and connected now, so that creating the group is
    // the rendezvous, as with Gloo, and a missing peer fails here.
    group->setBoundDeviceId(device);
    group->eagerConnectSingleDevice(device);
    return group;
  }
#endif
  auto gloo = c10d::ProcessGroupGloo::Options::create(options.timeout);
  // Peers reach this rank at the address its device binds. On one machine
  // that is loopback; otherwise the address the hostname resolves to, as
  // torch.distributed does by default.
  gloo->devices.push_back(
      !options.local_addr.empty()
          ? c10d::ProcessGroupGloo::createDeviceForHostname(options.local_addr)
      : IsLoopback(host)
          ? c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1")
          : c10d::ProcessGroupGloo::createDefaultDevice());
  return c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, size, gloo);
}

absl::Status ValidateOptions(const DistOptions& options) {
  if (options.world_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("world_size must be >= 1, got ", options.world_size));
  }
  if (options.world_size > std::numeric_limits<int>::max()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "world_size must fit in an int, got ", options.world_size));
  }
  if (options.rank < 0 || options.rank >= options.world_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("rank must be in [0, world_size ", options.world_size,
                     "), got ", options.rank));
  }
  if (options.local_rank < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("local_rank must be >= 0, got ", options.local_rank));
  }
  if (options.timeout.count() <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("timeout must be > 0 ms, got ", options.timeout.count()));
  }
  if (options.backend == "nccl") {
#ifndef MOMENTUM_WITH_CUDA
    return absl::InvalidArgumentError(
        "backend \"nccl\" needs a build with MOMENTUM_WITH_CUDA");
#endif
  } else if (options.backend != "gloo") {
    return absl::InvalidArgumentError(absl::StrCat(
        "backend must be \"gloo\" or \"nccl\", got \"", options.backend, "\""));
  }
  return absl::OkStatus();
}

std::string RankContext(absl::string_view op, int64_t rank,
                        int64_t world_size) {
  return absl::StrCat(op, " (rank ", rank, " of ", world_size, ")");
}

}  // namespace

absl::StatusOr<DistOptions> DistOptionsFromEnv() {
  DistOptions options;
  MOMENTUM_ASSIGN_OR_RETURN(std::string world_size, RequiredEnv("WORLD_SIZE"));
  MOMENTUM_ASSIGN_OR_RETURN(
      options.world_size, ParseEnvInt("WORLD_SIZE", world_size, 1,
                                      std::numeric_limits<int>::max(), ">= 1"));
  MOMENTUM_ASSIGN_OR_RETURN(std::string rank, RequiredEnv("RANK"));
  MOMENTUM_ASSIGN_OR_RETURN(options.rank,
                            ParseEnvInt("RANK", rank, 0, options.world_size - 1,
                                        "in [0, WORLD_SIZE)"));
  if (const char* local_rank = std::getenv("LOCAL_RANK")) {
    MOMENTUM_ASSIGN_OR_RETURN(
        options.local_rank,
        ParseEnvInt("LOCAL_RANK", local_rank, 0, options.world_size - 1,
                    "in [0, WORLD_SIZE)"));
  }
  // One rank talks to no one, so it needs no address; one that is given is
  // still checked.
  const bool alone = options.world_size == 1;
  const char* addr = std::getenv("MASTER_ADDR");
  if (addr == nullptr && !alone) {
    return RequiredEnv("MASTER_ADDR").status();
  }
  if (addr != nullptr) {
    if (absl::StripAsciiWhitespace(addr).empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "MASTER_ADDR must be a host name or address, got \"", addr, "\""));
    }
    options.master_addr = std::string(absl::StripAsciiWhitespace(addr));
  }
  if (const char* local = std::getenv("MOMENTUM_LOCAL_ADDR")) {
    options.local_addr = std::string(absl::StripAsciiWhitespace(local));
  }
  const char* port = std::getenv("MASTER_PORT");
  if (port == nullptr && !alone) {
    return RequiredEnv("MASTER_PORT").status();
  }
  if (port != nullptr) {
    MOMENTUM_ASSIGN_OR_RETURN(
        options.master_port,
        ParseEnvInt("MASTER_PORT", port, 1, 65535, "in [1, 65535]"));
  }
  return options;
}

struct ProcessGroup::Impl {
  // Where the backend's tensors live: the CPU for Gloo, the rank's GPU for
  // NCCL.
  at::Device device = at::Device(at::kCPU);
  c10::intrusive_ptr<c10d::Store> store;
  // Declared after the store so that it is destroyed first.
  c10::intrusive_ptr<CollectiveBackend> backend;
};

ProcessGroup::ProcessGroup(const DistOptions& options,
                           std::unique_ptr<Impl> impl)
    : rank_(options.rank),
      world_size_(options.world_size),
      timeout_(options.timeout),
      impl_(std::move(impl)) {}

ProcessGroup::~ProcessGroup() = default;

absl::StatusOr<std::unique_ptr<ProcessGroup>> ProcessGroup::Create(
    const DistOptions& options) {
  MOMENTUM_RETURN_IF_ERROR(ValidateOptions(options));
  if (options.world_size == 1 && !options.open_single) {
    return std::unique_ptr<ProcessGroup>(new ProcessGroup(options, nullptr));
  }
  if (options.master_addr.empty()) {
    return absl::InvalidArgumentError("master_addr must not be empty");
  }
  const int64_t min_port = options.rank == 0 ? 0 : 1;
  if (options.master_port < min_port || options.master_port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(
        "master_port must be in [", min_port, ", 65535] on rank ", options.rank,
        " (only rank 0 may let the OS pick one), got ", options.master_port));
  }
  c10d::TCPStoreOptions store_options;
  store_options.port = static_cast<std::uint16_t>(options.master_port);
  store_options.isServer = options.rank == 0;
  store_options.numWorkers = static_cast<std::size_t>(options.world_size);
  // The backend's rendezvous waits for the ranks; the store need not.
  store_options.waitWorkers = false;
  store_options.timeout = options.timeout;
  c10::intrusive_ptr<c10d::TCPStore> store;
  try {
    store =
        c10::make_intrusive<c10d::TCPStore>(options.master_addr, store_options);
  } catch (...) {
    return StatusFromException(
        std::current_exception(),
        RankContext(absl::StrCat("rendezvous with ", options.master_addr, ":",
                                 options.master_port),
                    options.rank, options.world_size));
  }
  const std::string address =
      absl::StrCat(store->getHost(), ":", store->getPort());
  return Join(options, std::move(store), address);
}

absl::StatusOr<std::unique_ptr<ProcessGroup>> ProcessGroup::Create(
    const DistOptions& options, c10::intrusive_ptr<c10d::Store> store) {
  MOMENTUM_RETURN_IF_ERROR(ValidateOptions(options));
  if (!store) return absl::InvalidArgumentError("store must not be null");
  if (options.world_size == 1 && !options.open_single) {
    return std::unique_ptr<ProcessGroup>(new ProcessGroup(options, nullptr));
  }
  std::string address = "the given store";
  if (const auto* tcp = dynamic_cast<const c10d::TCPStore*>(store.get())) {
    address = absl::StrCat(tcp->getHost(), ":", tcp->getPort());
  }
  return Join(options, std::move(store), address);
}

absl::StatusOr<std::unique_ptr<ProcessGroup>> ProcessGroup::Join(
    const DistOptions& options, c10::intrusive_ptr<c10d::Store> store,
    const std::string& store_address) {
  // The host the Gloo device binds: the store's when it is a TCPStore (its
  // peers reach it the same way), otherwise master_addr.
  std::string host = options.master_addr;
  if (const auto* tcp = dynamic_cast<const c10d::TCPStore*>(store.get())) {
    host = tcp->getHost();
  }
  auto impl = std::make_unique<Impl>();
  // A prefix of our own keeps the group's keys apart from anything else the
  // caller keeps in the store.
  impl->store =
      c10::make_intrusive<c10d::PrefixStore>("momentum/", std::move(store));
  try {
    impl->backend = MakeBackend(options, impl->store, host);
    impl->device = BackendDevice(options);
  } catch (...) {
    return StatusFromException(
        std::current_exception(),
        RankContext(absl::StrCat("rendezvous with ", store_address),
                    options.rank, options.world_size));
  }
  return std::unique_ptr<ProcessGroup>(
      new ProcessGroup(options, std::move(impl)));
}

PendingAllReduce::PendingAllReduce() = default;
PendingAllReduce::PendingAllReduce(PendingAllReduce&&) noexcept = default;
PendingAllReduce& PendingAllReduce::operator=(PendingAllReduce&&) noexcept =
    default;
PendingAllReduce::~PendingAllReduce() = default;

absl::Status ProcessGroup::CheckUsable(absl::string_view op) const {
  if (broken_.ok()) return absl::OkStatus();
  return absl::FailedPreconditionError(
      absl::StrCat(RankContext(op, rank_, world_size_),
                   ": the process group failed earlier and cannot be used: ",
                   broken_.message()));
}

template <typename StartFn>
absl::StatusOr<c10::intrusive_ptr<c10d::Work>> ProcessGroup::StartCollective(
    absl::string_view op, StartFn start) {
  MOMENTUM_RETURN_IF_ERROR(CheckUsable(op));
  try {
    return start();
  } catch (...) {
    broken_ = StatusFromException(std::current_exception(),
                                  RankContext(op, rank_, world_size_));
    return broken_;
  }
}

absl::Status ProcessGroup::WaitCollective(
    absl::string_view op, const c10::intrusive_ptr<c10d::Work>& work) {
  MOMENTUM_RETURN_IF_ERROR(CheckUsable(op));
  const auto begin = std::chrono::steady_clock::now();
  try {
    if (impl_->device.is_cuda()) {
      // NCCL: the current stream waits for the collective, the host does
      // not (a wait with a timeout would block the host until the device is
      // done); NCCL's watchdog ends the process at the timeout (MakeBackend).
      work->wait();
    } else {
      // Gloo bounds each collective by the timeout itself and throws
      // (c10d::TimeoutError in 2.x, a c10::DistNetworkError). The longer
      // bound here only keeps a backend that does not from hanging.
      work->wait(2 * timeout_);
    }
  } catch (...) {
    broken_ = StatusFromException(std::current_exception(),
                                  RankContext(op, rank_, world_size_));
    return broken_;
  }
  collective_seconds_ +=
      std::chrono::duration<double>(std::chrono::steady_clock::now() - begin)
          .count();
  return absl::OkStatus();
}

template <typename StartFn>
absl::Status ProcessGroup::RunCollective(absl::string_view op, StartFn start) {
  MOMENTUM_ASSIGN_OR_RETURN(c10::intrusive_ptr<c10d::Work> work,
                            StartCollective(op, start));
  return WaitCollective(op, work);
}

absl::StatusOr<at::Tensor> ProcessGroup::AllGather(const at::Tensor& local) {
  if (!local.defined() || local.dim() == 0) {
    return absl::InvalidArgumentError(
        "AllGather needs a tensor with at least one dimension");
  }
  if (is_local()) return local.clone();
  at::Tensor input = OnBackendDevice(local).contiguous();
  std::vector<int64_t> shape = input.sizes().vec();
  const int64_t rows = shape[0];
  shape[0] *= world_size_;
  at::Tensor result = at::empty(shape, input.options());
  // The backend copies each rank's tensor into its slice of `result`.
  std::vector<std::vector<at::Tensor>> outputs(1);
  for (int64_t r = 0; r < world_size_; ++r) {
    outputs[0].push_back(result.narrow(0, r * rows, rows));
  }
  std::vector<at::Tensor> inputs{input};
  c10d::AllgatherOptions opts;
  opts.timeout = timeout_;
  MOMENTUM_RETURN_IF_ERROR(RunCollective("AllGather", [&] {
    return impl_->backend->allgather(outputs, inputs, opts);
  }));
  return result.to(local.device());
}

absl::Status ProcessGroup::Broadcast(at::Tensor& tensor, int64_t root) {
  if (!tensor.defined()) {
    return absl::InvalidArgumentError("Broadcast needs a defined tensor");
  }
  if (root < 0 || root >= world_size_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Broadcast root must be in [0, ", world_size_, "), got ", root));
  }
  if (is_local()) return absl::OkStatus();
  // The backends write into the tensor's storage as if it were dense.
  at::Tensor buffer = OnBackendDevice(tensor).contiguous();
  std::vector<at::Tensor> tensors{buffer};
  c10d::BroadcastOptions opts;
  opts.rootRank = root;
  opts.rootTensor = 0;
  opts.timeout = timeout_;
  MOMENTUM_RETURN_IF_ERROR(RunCollective(
      "Broadcast", [&] { return impl_->backend->broadcast(tensors, opts); }));
  if (!buffer.is_same(tensor)) {
    at::NoGradGuard no_grad;
    tensor.copy_(buffer);
  }
  return absl::OkStatus();
}

absl::Status ProcessGroup::AllReduceMean(std::vector<at::Tensor>& tensors,
                                         int64_t bucket_bytes) {
  if (bucket_bytes <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "AllReduceMean bucket_bytes must be > 0, got ", bucket_bytes));
  }
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (!tensors[i].defined() ||
        !at::isFloatingType(tensors[i].scalar_type())) {
      return absl::InvalidArgumentError(absl::StrCat(
          "AllReduceMean needs floating-point tensors, tensor ", i, " is ",
          tensors[i].defined()
              ? std::string(c10::toString(tensors[i].scalar_type()))
              : std::string("undefined")));
    }
  }
  if (is_local()) return absl::OkStatus();
  at::NoGradGuard no_grad;
  size_t begin = 0;
  while (begin < tensors.size()) {
    const at::Tensor& first = tensors[begin];
    int64_t bytes = first.numel() * first.element_size();
    size_t end = begin + 1;
    while (end < tensors.size() &&
           tensors[end].scalar_type() == first.scalar_type() &&
           tensors[end].device() == first.device()) {
      const int64_t next = tensors[end].numel() * tensors[end].element_size();
      if (bytes + next > bucket_bytes) break;
      bytes += next;
      ++end;
    }
    MOMENTUM_RETURN_IF_ERROR(AllReduceBucket(tensors, begin, end));
    begin = end;
  }
  return absl::OkStatus();
}

absl::Status ProcessGroup::AllReduceBucket(std::vector<at::Tensor>& tensors,
                                           size_t begin, size_t end) {
  at::NoGradGuard no_grad;
  const std::vector<at::Tensor> bucket(tensors.begin() + begin,
                                       tensors.begin() + end);
  MOMENTUM_ASSIGN_OR_RETURN(PendingAllReduce pending,
                            StartAllReduceMean(PackBucket(bucket)));
  MOMENTUM_RETURN_IF_ERROR(Wait(pending));
  UnpackBucket(pending.buffer(), bucket);
  return absl::OkStatus();
}

absl::StatusOr<PendingAllReduce> ProcessGroup::StartAllReduceMean(
    at::Tensor flat) {
  if (!flat.defined() || !at::isFloatingType(flat.scalar_type()) ||
      !flat.is_contiguous()) {
    return absl::InvalidArgumentError(
        "StartAllReduceMean needs a contiguous floating-point tensor");
  }
  PendingAllReduce pending;
  if (is_local()) {
    pending.buffer_ = std::move(flat);
    return pending;
  }
  at::NoGradGuard no_grad;
  pending.buffer_ = OnBackendDevice(flat);
  // Divided before the sum, as DistributedDataParallel does: with three or
  // more ranks the rounding then matches PyTorch's bit for bit.
  pending.buffer_.div_(world_size_);
  std::vector<at::Tensor> buffers{pending.buffer_};
  c10d::AllreduceOptions opts;
  opts.reduceOp = c10d::ReduceOp::SUM;
  opts.timeout = timeout_;
  MOMENTUM_ASSIGN_OR_RETURN(pending.work_,
                            StartCollective("AllReduceMean", [&] {
                              return impl_->backend->allreduce(buffers, opts);
                            }));
  return pending;
}

absl::Status ProcessGroup::Wait(PendingAllReduce& pending) {
  if (pending.work_ == nullptr) return absl::OkStatus();
  MOMENTUM_RETURN_IF_ERROR(WaitCollective("AllReduceMean", pending.work_));
  pending.work_.reset();
  return absl::OkStatus();
}

namespace {

// `tensor`'s elements in the order they lie in memory, as a 1-d view when
// its layout allows (contiguous or channels_last, as gradients are), else a
// copy in logical order. Every rank lays out a tensor alike, so a bucket's
// elements line up across the ranks.
at::Tensor FlatInMemoryOrder(const at::Tensor& tensor) {
  if (tensor.is_non_overlapping_and_dense()) {
    return tensor.as_strided({tensor.numel()}, {1}, tensor.storage_offset());
  }
  return tensor.reshape(-1);
}

}  // namespace

at::Tensor PackBucket(const std::vector<at::Tensor>& tensors) {
  if (tensors.size() == 1) return FlatInMemoryOrder(tensors[0]).contiguous();
  std::vector<at::Tensor> pieces;
  pieces.reserve(tensors.size());
  for (const at::Tensor& t : tensors) pieces.push_back(FlatInMemoryOrder(t));
  return at::cat(pieces);
}

void UnpackBucket(const at::Tensor& buffer,
                  const std::vector<at::Tensor>& tensors) {
  int64_t offset = 0;
  for (const at::Tensor& t : tensors) {
    const at::Tensor part = buffer.narrow(0, offset, t.numel());
    offset += t.numel();
    if (!t.is_non_overlapping_and_dense()) {
      t.copy_(part.view(t.sizes()));  // packed in logical order
      continue;
    }
    at::Tensor target = FlatInMemoryOrder(t);
    // A lone tensor summed in place is its own buffer.
    if (target.data_ptr() != part.data_ptr()) target.copy_(part);
  }
}

at::Tensor ProcessGroup::OnBackendDevice(const at::Tensor& tensor) const {
  return tensor.device() == impl_->device ? tensor : tensor.to(impl_->device);
}

absl::Status ProcessGroup::Barrier() {
  if (is_local()) return absl::OkStatus();
  c10d::BarrierOptions opts;
  opts.timeout = timeout_;
  return RunCollective("Barrier",
                       [&] { return impl_->backend->barrier(opts); });
}

}  // namespace momentum::worker
