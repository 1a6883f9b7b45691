#include "common/job_progress.h"

namespace momentum {

v1::JobProgress EmptyProgress() {
  v1::JobProgress progress;
  progress.set_knn_top1(-1);
  progress.set_eta_seconds(-1);
  return progress;
}

void FoldSample(const v1::MetricSample& sample, v1::JobProgress* progress) {
  if (sample.knn_top1() >= 0) progress->set_knn_top1(sample.knn_top1());
  if (sample.rank() != 0) return;
  progress->set_epoch(sample.epoch());
  progress->set_step(sample.step());
  progress->set_fraction(sample.fraction());
  progress->set_loss(sample.loss());
  progress->set_learning_rate(sample.learning_rate());
  progress->set_images_per_second(sample.images_per_second());
  progress->set_eta_seconds(sample.eta_seconds());
}

}  // namespace momentum
