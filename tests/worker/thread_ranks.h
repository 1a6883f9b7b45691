// Runs the ranks of a real Gloo process group as threads of one process, with
// the TCPStore on a port the OS assigns. For tests and the cross-check tool.
#ifndef MOMENTUM_TESTS_WORKER_THREAD_RANKS_H_
#define MOMENTUM_TESTS_WORKER_THREAD_RANKS_H_

#include <stdlib.h>

#include <chrono>
#include <functional>
#include <mutex>
#include <thread>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <vector>

#include "absl/status/status.h"
#include "worker/process_group.h"

namespace momentum::worker::testing {

// Calls body(rank, group) on one thread per rank and joins them. Returns the
// first error of a rank that could not join the group (its body is skipped).
//
// Turns off c10d's flight recorder for the process: in torch 2.11 its
// record() adds a new group to a std::map before taking its lock, so the
// first collectives of two groups of one process, started at once from two
// threads, can corrupt the map (a segfault in _Rb_tree_insert_and_rebalance
// under ProcessGroupGloo::enqueue, seen in moco_dist_test and
// grad_averager_test). A worker process holds one group, so it never races.
// The recorder reads the variable when it is first used, before any group.
inline absl::Status RunRanks(
    int64_t world, std::chrono::milliseconds timeout,
    const std::function<void(int64_t, ProcessGroup&)>& body) {
  setenv("TORCH_FR_BUFFER_SIZE", "0", /*overwrite=*/1);
  c10d::TCPStoreOptions server_options;
  server_options.port = 0;
  server_options.isServer = true;
  server_options.waitWorkers = false;
  server_options.timeout = timeout;
  auto server =
      c10::make_intrusive<c10d::TCPStore>("127.0.0.1", server_options);
  std::mutex mu;
  absl::Status first_error;
  std::vector<std::thread> threads;
  for (int64_t rank = 0; rank < world; ++rank) {
    threads.emplace_back([&, rank] {
      c10::intrusive_ptr<c10d::Store> store = server;
      if (rank > 0) {
        c10d::TCPStoreOptions o = server_options;
        o.isServer = false;
        o.port = server->getPort();
        store = c10::make_intrusive<c10d::TCPStore>("127.0.0.1", o);
      }
      DistOptions options;
      options.rank = rank;
      options.world_size = world;
      options.timeout = timeout;
      auto group = ProcessGroup::Create(options, store);
      if (!group.ok()) {
        std::lock_guard<std::mutex> lock(mu);
        if (first_error.ok()) first_error = group.status();
        return;
      }
      body(rank, **group);
    });
  }
  for (auto& t : threads) t.join();
  return first_error;
}

}  // namespace momentum::worker::testing

#endif  // MOMENTUM_TESTS_WORKER_THREAD_RANKS_H_
