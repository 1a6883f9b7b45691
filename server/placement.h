// Where a gang's ranks go: a pure function of what each launcher has free.
// A CPU job's rank takes a slot, a CUDA job's rank one GPU (and no slot: its
// host threads only feed the GPU, so a node's CPU and GPU jobs do not wait
// for each other). A gang is placed whole or not at all.
//
//   std::vector<Placement> p = Place({{local, 4, {}}, {agent, 2, {0, 1}}},
//                                    /*world_size=*/2, /*cuda=*/true);
#ifndef MOMENTUM_SERVER_PLACEMENT_H_
#define MOMENTUM_SERVER_PLACEMENT_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "server/launcher.h"

namespace momentum::server {

// What one launcher has free now.
struct Capacity {
  std::shared_ptr<Launcher> launcher;
  int64_t free_slots = 0;
  std::vector<int> free_gpus;  // in the order the launcher offers them
};

// Ranks of a gang on one launcher; for a CUDA job with the GPU each owns
// (same order; empty for a CPU job).
struct Placement {
  std::shared_ptr<Launcher> launcher;
  std::vector<int64_t> ranks;
  std::vector<int> gpus;
};

// The whole gang on the first launcher that holds it (the local one is
// first), else spread over launchers, most free first, so that rank 0 is
// where most ranks run. Empty when the gang does not fit now.
std::vector<Placement> Place(const std::vector<Capacity>& capacity,
                             int64_t world_size, bool cuda);

// Whether `world_size` ranks could ever fit, were every slot (or GPU) of
// these launchers free: `total_slots` and `total_gpus` count used and free.
bool CouldEverFit(int64_t total_slots, int64_t total_gpus, int64_t world_size,
                  bool cuda);

}  // namespace momentum::server

#endif  // MOMENTUM_SERVER_PLACEMENT_H_
