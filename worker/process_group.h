// The ranks of one training job as a c10d process group: a rendezvous through
// a c10d TCPStore, then blocking collectives (all-gather, broadcast, bucketed
// all-reduce mean, barrier) that return absl::Status instead of throwing.
// Gloo on CPU; NCCL on CUDA in a build with MOMENTUM_WITH_CUDA. With one rank
// every collective is a local no-op and nothing is opened (unless
// DistOptions::open_single). A tensor on another device than the backend's
// goes through a copy on the backend's device: host tensors through the GPU
// with NCCL, CUDA tensors through host memory with Gloo.
//
// Usage, one rank of a job started by torchrun or the launcher:
//   MOMENTUM_ASSIGN_OR_RETURN(DistOptions options, DistOptionsFromEnv());
//   MOMENTUM_ASSIGN_OR_RETURN(std::unique_ptr<ProcessGroup> group,
//                             ProcessGroup::Create(options));
//   MOMENTUM_ASSIGN_OR_RETURN(at::Tensor all_keys, group->AllGather(keys));
//   MOMENTUM_RETURN_IF_ERROR(group->AllReduceMean(grads));
#ifndef MOMENTUM_WORKER_PROCESS_GROUP_H_
#define MOMENTUM_WORKER_PROCESS_GROUP_H_

#include <ATen/core/Tensor.h>
#include <c10/util/intrusive_ptr.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace c10d {
class Store;
class Work;
}  // namespace c10d

namespace momentum::worker {

struct DistOptions {
  int64_t rank = 0;
  int64_t world_size = 1;
  // The rank within its machine (torchrun's LOCAL_RANK); with NCCL the index
  // of the GPU this rank uses.
  int64_t local_rank = 0;
  // Where rank 0 serves the TCPStore. Port 0 lets the OS pick one; only rank 0
  // may use it, and only when no one else needs to connect (tests).
  std::string master_addr = "127.0.0.1";
  int64_t master_port = 0;
  // Bounds the rendezvous and every collective.
  std::chrono::milliseconds timeout{300000};
  std::string backend = "gloo";  // "gloo", or "nccl" with MOMENTUM_WITH_CUDA
  // The CUDA device of this rank with NCCL; -1: local_rank
  // (worker/device.h resolves it).
  int64_t cuda_device = -1;
  // Opens the backend even for a group of one rank, whose collectives
  // then run through it (checks of a backend on one GPU); otherwise one
  // rank opens nothing.
  bool open_single = false;
  // The address this rank's Gloo connections bind and its peers reach it at
  // (MOMENTUM_LOCAL_ADDR; a node agent sets its advertised address). Empty:
  // loopback when the store is on loopback, else the address the hostname
  // resolves to, as torch.distributed does.
  std::string local_addr;
};

// Reads the variables torchrun sets: RANK, WORLD_SIZE, MASTER_ADDR,
// MASTER_PORT and, optionally, LOCAL_RANK (default 0); and, optionally,
// MOMENTUM_LOCAL_ADDR. MASTER_ADDR and
// MASTER_PORT are required only when WORLD_SIZE > 1. Returns NOT_FOUND naming
// the first required variable that is unset, INVALID_ARGUMENT naming the
// variable and its rule when one is malformed, e.g.
//   RANK must be an integer in [0, WORLD_SIZE), got "x"
absl::StatusOr<DistOptions> DistOptionsFromEnv();

class ProcessGroup;

// A mean all-reduce started by ProcessGroup::StartAllReduceMean and not yet
// waited for. Movable; destroying one unwaited leaves the collective running
// on the backend's threads (which keep its buffer alive).
class PendingAllReduce {
 public:
  PendingAllReduce();
  PendingAllReduce(PendingAllReduce&&) noexcept;
  PendingAllReduce& operator=(PendingAllReduce&&) noexcept;
  ~PendingAllReduce();

  // The buffer that holds the mean once ProcessGroup::Wait() returns OK: the
  // tensor given to StartAllReduceMean, or its copy on the backend's device.
  const at::Tensor& buffer() const { return buffer_; }

 private:
  friend class ProcessGroup;
  at::Tensor buffer_;
  c10::intrusive_ptr<c10d::Work> work_;
};

// A bucket of tensors (one dtype and device) as one 1-d buffer for
// StartAllReduceMean, each tensor's elements in the order they lie in memory:
// a view of a lone dense tensor (contiguous or channels_last), which is then
// summed in place, else a copy. UnpackBucket writes a buffer of that layout
// back into the tensors (nothing for a tensor that is its own buffer).
at::Tensor PackBucket(const std::vector<at::Tensor>& tensors);
void UnpackBucket(const at::Tensor& buffer,
                  const std::vector<at::Tensor>& tensors);

// One rank's handle on the process group of a job. Thread-compatible: one
// thread calls it. Lifecycle: Create() joins the group (blocking until every
// rank has joined or the timeout passes); the c10d backend it owns runs the
// collectives on threads of its own, which the destructor joins after the
// work in flight has finished or timed out. The store is needed only while
// the group forms; rank 0 serves it for as long as its group lives.
//
// Every collective blocks until it is done on this rank and must be called by
// every rank in the same order with matching shapes and dtypes. A collective
// that does not complete within the timeout returns DEADLINE_EXCEEDED, one
// that loses a peer returns UNAVAILABLE; either leaves the group broken, and
// every later collective returns FAILED_PRECONDITION at once: a job recovers
// by rebuilding the whole group (the coordinator restarts the gang).
class ProcessGroup {
 public:
  // Gradient buckets of 25 MiB, as torch.nn.parallel.DistributedDataParallel.
  static constexpr int64_t kDefaultBucketBytes = int64_t{25} << 20;

  // Joins the group through a TCPStore at master_addr:master_port, which rank
  // 0 serves. Blocks until all ranks have joined. Returns INVALID_ARGUMENT
  // for bad options, DEADLINE_EXCEEDED when the rendezvous does not complete
  // within the timeout ("rendezvous with 127.0.0.1:29500 (rank 1 of 2): ..."),
  // UNAVAILABLE for other failures (e.g. the port is taken).
  static absl::StatusOr<std::unique_ptr<ProcessGroup>> Create(
      const DistOptions& options);
  // As above through a store the caller made (e.g. a TCPStore on an
  // OS-assigned port shared by ranks on threads); master_addr and master_port
  // are not used. The group keys its entries under a prefix of its own.
  static absl::StatusOr<std::unique_ptr<ProcessGroup>> Create(
      const DistOptions& options, c10::intrusive_ptr<c10d::Store> store);

  ProcessGroup(const ProcessGroup&) = delete;
  ProcessGroup& operator=(const ProcessGroup&) = delete;
  ~ProcessGroup();

  int64_t rank() const { return rank_; }
  int64_t world_size() const { return world_size_; }

  // The ranks' `local` tensors (all of one shape and dtype, at least one
  // dimension) concatenated along dim 0 in rank order, as a new tensor.
  absl::StatusOr<at::Tensor> AllGather(const at::Tensor& local);

  // Overwrites `tensor` on every rank with its value on `root`.
  absl::Status Broadcast(at::Tensor& tensor, int64_t root);

  // Replaces each floating-point tensor by its mean across the ranks. Runs
  // one all-reduce per bucket: consecutive tensors of one dtype and device
  // flattened into one buffer of at most `bucket_bytes` (a larger tensor is a
  // bucket of its own). After a failure the tensors hold unspecified values.
  absl::Status AllReduceMean(std::vector<at::Tensor>& tensors,
                             int64_t bucket_bytes = kDefaultBucketBytes);

  // Starts the mean all-reduce of one dense tensor and returns at once; the
  // backend's threads run it while the caller goes on (the gradients of a
  // backward pass, worker/grad_averager.h). `flat` (contiguous) is divided by
  // the rank count in place first, as AllReduceMean does; the result is in
  // pending.buffer() after Wait(). Collectives are matched in the order they
  // start, so every rank must start them in the same order. With one rank,
  // returns at once and the buffer is `flat`.
  absl::StatusOr<PendingAllReduce> StartAllReduceMean(at::Tensor flat);
  // Blocks until `pending` is done on this rank, with the errors and the
  // timeout of the blocking collectives; the time spent here counts in
  // collective_seconds(). A pending collective of one rank is done.
  absl::Status Wait(PendingAllReduce& pending);

  // Returns once every rank has called Barrier().
  absl::Status Barrier();

  // Wall seconds this rank has spent inside collectives so far, waiting for
  // slower ranks included: the communication share of a training step (of
  // a started all-reduce, the time spent in Wait()).
  double collective_seconds() const { return collective_seconds_; }

 private:
  struct Impl;

  ProcessGroup(const DistOptions& options, std::unique_ptr<Impl> impl);
  static absl::StatusOr<std::unique_ptr<ProcessGroup>> Join(
      const DistOptions& options, c10::intrusive_ptr<c10d::Store> store,
      const std::string& store_address);
  absl::Status AllReduceBucket(std::vector<at::Tensor>& tensors, size_t begin,
                               size_t end);
  template <typename StartFn>
  absl::Status RunCollective(absl::string_view op, StartFn start);
  // FAILED_PRECONDITION naming `op` once the group is broken.
  absl::Status CheckUsable(absl::string_view op) const;
  // The two halves of RunCollective: the work `start` returned, or the error
  // that broke the group; and the wait for it.
  template <typename StartFn>
  absl::StatusOr<c10::intrusive_ptr<c10d::Work>> StartCollective(
      absl::string_view op, StartFn start);
  absl::Status WaitCollective(absl::string_view op,
                              const c10::intrusive_ptr<c10d::Work>& work);

  // `tensor` on the backend's device: itself, or a copy there.
  at::Tensor OnBackendDevice(const at::Tensor& tensor) const;
  // True when collectives are local no-ops (one rank, nothing opened).
  bool is_local() const { return impl_ == nullptr; }

  int64_t rank_;
  int64_t world_size_;
  std::chrono::milliseconds timeout_;
  std::unique_ptr<Impl> impl_;  // null with one rank
  absl::Status broken_;         // the failure that broke the group
  double collective_seconds_ = 0;
};

}  // namespace momentum::worker

#endif  // MOMENTUM_WORKER_PROCESS_GROUP_H_
