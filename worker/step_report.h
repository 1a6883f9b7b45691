// What the trainer reports after each logging window: the training series
// of one rank, free of LibTorch so that the gRPC reporter (worker/reporter.h)
// and the coordinator can share it without the trainer's headers.
#ifndef MOMENTUM_WORKER_STEP_REPORT_H_
#define MOMENTUM_WORKER_STEP_REPORT_H_

#include <cstdint>

namespace momentum::worker {

struct StepReport {
  int64_t rank = 0;
  int64_t step = 0;              // optimiser steps done by the group
  double epoch = 0;              // epochs completed + fraction of the current
  double fraction = 0;           // of the run, in [0, 1]
  double loss = 0;               // this rank's mean loss over the window
  double learning_rate = 0;      // of the last step
  double images_per_second = 0;  // of the group, by this rank's clock
  // Mean seconds per step over the window, by phase (worker/trainer.h).
  double data_seconds = 0;
  double forward_seconds = 0;
  double backward_seconds = 0;
  double communication_seconds = 0;
  double optimizer_seconds = 0;
  // Of the last step: mean positive and negative logits (cosine
  // similarities, before the temperature).
  double positive_logit_mean = 0;
  double negative_logit_mean = 0;
  // Of the last step: the standard deviation across the batch of each
  // dimension of the L2-normalised query features, mean and minimum over
  // the dimensions (about 1/sqrt(dim) when healthy, 0 when collapsed).
  double feature_std_mean = 0;
  double feature_std_min = 0;
  // Age in steps of the oldest key in the queue after the last step: keys
  // enqueued at step s have age (step - s); the random initial keys count
  // as enqueued at step 0.
  int64_t queue_staleness_steps = 0;
  double knn_top1 = -1;     // after an evaluation, in [0, 1]; else -1
  double eta_seconds = -1;  // of training left; -1 when unknown
};

}  // namespace momentum::worker

#endif  // MOMENTUM_WORKER_STEP_REPORT_H_
