// One definition of how a job's progress follows its ranks' metric samples,
// for the coordinator (Job.progress) and the client's watch line alike.
//
//   v1::JobProgress progress = EmptyProgress();
//   FoldSample(sample, &progress);   // for each sample, in order
#ifndef MOMENTUM_COMMON_JOB_PROGRESS_H_
#define MOMENTUM_COMMON_JOB_PROGRESS_H_

#include "momentum/v1/jobs.pb.h"

namespace momentum {

// Progress before any sample: no kNN result and no ETA (-1 each).
v1::JobProgress EmptyProgress();

// Rank 0's view (step, epoch, fraction, loss, learning rate, images per
// second, ETA) stands for the group: the other ranks' samples carry their
// own loss at the same step and would make the figures flicker. The kNN
// monitor runs on the whole group, so its result counts from whichever rank
// reports it.
void FoldSample(const v1::MetricSample& sample, v1::JobProgress* progress);

}  // namespace momentum

#endif  // MOMENTUM_COMMON_JOB_PROGRESS_H_
