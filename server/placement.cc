#include "server/placement.h"

#include <algorithm>

namespace momentum::server {

std::vector<Placement> Place(const std::vector<Capacity>& capacity,
                             int64_t world_size, bool cuda) {
  if (world_size < 1) return {};
  auto free_of = [&](const Capacity& c) {
    return cuda ? static_cast<int64_t>(c.free_gpus.size()) : c.free_slots;
  };
  std::vector<Placement> placement;
  for (const Capacity& c : capacity) {
    if (free_of(c) >= world_size) {
      Placement all{c.launcher, {}, {}};
      for (int64_t r = 0; r < world_size; ++r) all.ranks.push_back(r);
      if (cuda)
        all.gpus.assign(c.free_gpus.begin(), c.free_gpus.begin() + world_size);
      return {all};
    }
  }
  std::vector<const Capacity*> order;
  int64_t total = 0;
  for (const Capacity& c : capacity) {
    if (free_of(c) > 0) order.push_back(&c);
    total += free_of(c);
  }
  if (total < world_size) return {};
  std::stable_sort(order.begin(), order.end(),
                   [&](const Capacity* a, const Capacity* b) {
                     return free_of(*a) > free_of(*b);
                   });
  int64_t next = 0;
  for (const Capacity* c : order) {
    Placement part{c->launcher, {}, {}};
    for (int64_t i = 0; i < free_of(*c) && next < world_size; ++i) {
      part.ranks.push_back(next++);
      if (cuda) part.gpus.push_back(c->free_gpus[static_cast<size_t>(i)]);
    }
    placement.push_back(std::move(part));
    if (next == world_size) break;
  }
  return placement;
}

bool CouldEverFit(int64_t total_slots, int64_t total_gpus, int64_t world_size,
                  bool cuda) {
  return world_size <= (cuda ? total_gpus : total_slots);
}

}  // namespace momentum::server
