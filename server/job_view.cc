#include "server/job_view.h"

#include "common/job_progress.h"

namespace momentum::server {

void SetTimestamp(int64_t ms, google::protobuf::Timestamp* t) {
  t->set_seconds(ms / 1000);
  t->set_nanos(static_cast<int32_t>((ms % 1000) * 1000000));
}

v1::Job JobToProto(const JobRecord& job, const std::string& output_dir,
                   const v1::JobProgress& progress, int64_t queue_position) {
  v1::Job out;
  out.set_id(job.id);
  out.set_name(job.name);
  out.set_state(job.state);
  out.set_state_reason(job.state_reason);
  out.set_priority(static_cast<int32_t>(job.priority));
  out.set_world_size(static_cast<int32_t>(job.world_size));
  out.set_spec_yaml(job.spec_yaml);
  out.set_output_dir(output_dir);
  if (job.submit_ms > 0) SetTimestamp(job.submit_ms, out.mutable_submit_time());
  if (job.start_ms > 0) SetTimestamp(job.start_ms, out.mutable_start_time());
  if (job.end_ms > 0) SetTimestamp(job.end_ms, out.mutable_end_time());
  out.set_restarts(static_cast<int32_t>(job.restarts));
  out.set_export_path(job.export_path);
  out.set_owner(job.owner);
  out.set_queue_position(static_cast<int32_t>(queue_position));
  *out.mutable_progress() = progress;
  if (job.knn_top1 >= 0) out.mutable_progress()->set_knn_top1(job.knn_top1);
  return out;
}

void ProgressBoard::Fold(const std::string& job_id,
                         const v1::MetricSample& sample) {
  absl::MutexLock lock(&mu_);
  auto [it, added] = progress_.try_emplace(job_id, EmptyProgress());
  FoldSample(sample, &it->second);
}

void ProgressBoard::SetAccount(const std::string& job_id, int64_t attempt,
                               const v1::RunSummary& summary) {
  absl::MutexLock lock(&mu_);
  accounts_[job_id] = {attempt, summary};
}

std::optional<v1::RunSummary> ProgressBoard::Account(const std::string& job_id,
                                                     int64_t attempt) const {
  absl::MutexLock lock(&mu_);
  auto it = accounts_.find(job_id);
  if (it == accounts_.end() || it->second.first != attempt) return std::nullopt;
  return it->second.second;
}

void ProgressBoard::Finish(const std::string& job_id,
                           const v1::RunSummary& summary) {
  absl::MutexLock lock(&mu_);
  auto [it, added] = progress_.try_emplace(job_id, EmptyProgress());
  v1::JobProgress& p = it->second;
  p.set_step(summary.steps());
  p.set_epoch(summary.epochs_completed());
  p.set_fraction(1.0);
  p.set_eta_seconds(0);
  if (summary.knn_top1() >= 0) p.set_knn_top1(summary.knn_top1());
}

v1::JobProgress ProgressBoard::Get(const std::string& job_id) const {
  absl::MutexLock lock(&mu_);
  auto it = progress_.find(job_id);
  return it == progress_.end() ? EmptyProgress() : it->second;
}

}  // namespace momentum::server
