#include "server/server_metrics.h"

#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <algorithm>
#include <exception>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "server/job_store.h"

namespace momentum::server {

using prometheus::Counter;
using prometheus::Family;
using prometheus::Gauge;
using prometheus::Histogram;

namespace {

// A family with a `state` label of "used" and "free".
void SetUsedFree(Family<Gauge>* family, int64_t used, int64_t free) {
  family->Add({{"state", "used"}}).Set(static_cast<double>(used));
  family->Add({{"state", "free"}}).Set(static_cast<double>(free));
}

}  // namespace

struct ServerMetrics::Families {
  // Training, per job and rank.
  Family<Gauge>* loss;
  Family<Gauge>* learning_rate;
  Family<Gauge>* images_per_second;
  Family<Gauge>* phase_seconds;
  Family<Gauge>* positive_logit;
  Family<Gauge>* negative_logit;
  Family<Gauge>* feature_std_mean;
  Family<Gauge>* feature_std_min;
  Family<Gauge>* queue_staleness;
  Family<Gauge>* knn_top1;
  Family<Gauge>* epoch;
  Family<Gauge>* progress;
  Family<Gauge>* step;
  Family<Gauge>* eta;
  Family<Gauge>* straggler;
  // Service.
  Family<Gauge>* jobs;
  Family<Gauge>* job_state;
  Family<Gauge>* slots;
  Family<Gauge>* gpus;
  Family<Counter>* restarts;
  Family<Counter>* rpcs;
  Family<Histogram>* rpc_seconds;
  std::map<std::string, Histogram*> rpc_histograms;
};

absl::StatusOr<std::unique_ptr<ServerMetrics>> ServerMetrics::Create(
    const std::string& listen, std::chrono::seconds retention) {
  std::unique_ptr<ServerMetrics> m(new ServerMetrics());
  m->retention_ = retention;
  m->registry_ = std::make_shared<prometheus::Registry>();
  try {
    m->exposer_ = std::make_unique<prometheus::Exposer>(listen);
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve /metrics on ", listen, ": ", e.what()));
  }
  const std::vector<int> ports = m->exposer_->GetListeningPorts();
  if (ports.empty()) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve /metrics on ", listen));
  }
  m->port_ = ports.front();
  m->exposer_->RegisterCollectable(m->registry_);

  auto gauge = [&](const std::string& name, const std::string& help) {
    return &prometheus::BuildGauge().Name(name).Help(help).Register(
        *m->registry_);
  };
  auto f = std::make_unique<Families>();
  f->loss = gauge("momentum_train_loss",
                  "InfoNCE loss, mean over the rank's last logging window.");
  f->learning_rate =
      gauge("momentum_train_learning_rate", "Learning rate of the last step.");
  f->images_per_second =
      gauge("momentum_train_images_per_second",
            "Training images per second of the whole group, by this rank's "
            "clock.");
  f->phase_seconds = gauge(
      "momentum_train_step_phase_seconds",
      "Mean seconds per step spent in each phase (data, forward, backward, "
      "communication, optimizer) over the last logging window.");
  f->positive_logit = gauge(
      "momentum_train_positive_logit_mean",
      "Mean cosine similarity of queries and their positive keys, last step.");
  f->negative_logit =
      gauge("momentum_train_negative_logit_mean",
            "Mean cosine similarity of queries and the queue's negative keys, "
            "last step.");
  f->feature_std_mean = gauge(
      "momentum_train_feature_std_mean",
      "Standard deviation across the batch of each normalised query feature "
      "dimension, averaged over dimensions; near 0 means collapse.");
  f->feature_std_min =
      gauge("momentum_train_feature_std_min",
            "Smallest per-dimension standard deviation of the normalised "
            "query features.");
  f->queue_staleness = gauge("momentum_train_queue_staleness_steps",
                             "Age in steps of the oldest key in the queue.");
  f->knn_top1 = gauge("momentum_train_knn_top1_ratio",
                      "kNN top-1 accuracy on the test set after the latest "
                      "evaluation, as a ratio in [0, 1].");
  f->epoch = gauge("momentum_train_epoch",
                   "Epochs completed plus the fraction of the current one.");
  f->progress = gauge("momentum_train_progress_ratio",
                      "Fraction of the run done, in [0, 1].");
  f->step =
      gauge("momentum_train_global_step", "Optimiser steps done by the group.");
  f->eta = gauge("momentum_train_eta_seconds",
                 "Estimated seconds of training left.");
  f->straggler =
      gauge("momentum_train_straggler",
            "1 while the rank's compute time per step stays above "
            "scheduling.straggler_factor times the other ranks' median.");
  f->jobs = gauge("momentum_jobs", "Jobs in the store by state.");
  f->job_state = gauge("momentum_job_state",
                       "1 for a job's current state (one series per job).");
  f->slots = gauge("momentum_worker_slots",
                   "Worker slots of all launchers, used and free.");
  f->gpus = gauge("momentum_worker_gpus",
                  "GPUs of all launchers, used (by ranks of CUDA jobs) and "
                  "free.");
  f->restarts = &prometheus::BuildCounter()
                     .Name("momentum_job_restarts_total")
                     .Help("Gang relaunches of jobs.")
                     .Register(*m->registry_);
  f->rpcs = &prometheus::BuildCounter()
                 .Name("momentum_rpc_requests_total")
                 .Help("Finished RPCs by method and status code.")
                 .Register(*m->registry_);
  f->rpc_seconds = &prometheus::BuildHistogram()
                        .Name("momentum_rpc_duration_seconds")
                        .Help(
                            "Time to handle an RPC, by method (streams: "
                            "their whole life).")
                        .Register(*m->registry_);
  for (JobState s : {v1::JOB_STATE_PENDING, v1::JOB_STATE_RUNNING,
                     v1::JOB_STATE_RESTARTING, v1::JOB_STATE_SUCCEEDED,
                     v1::JOB_STATE_FAILED, v1::JOB_STATE_CANCELLED}) {
    f->jobs->Add({{"state", StateName(s)}}).Set(0);
  }
  SetUsedFree(f->slots, 0, 0);
  SetUsedFree(f->gpus, 0, 0);
  f->restarts->Add({});
  absl::MutexLock lock(&m->mu_);
  m->f_ = std::move(f);
  // Every method's series exist from the start, so rates and quantiles
  // read 0 rather than nothing before the first call ends.
  for (const char* method :
       {"SubmitJob", "GetJob", "ListJobs", "CancelJob", "WatchJob",
        "GetJobLogs", "ReportMetrics", "AgentSession"}) {
    m->f_->rpcs->Add({{"method", method}, {"code", "OK"}});
    m->RpcHistogramLocked(method);
  }
  return m;
}

ServerMetrics::~ServerMetrics() = default;

void ServerMetrics::OnSample(const std::string& job_id,
                             const v1::MetricSample& s) {
  absl::MutexLock lock(&mu_);
  ExpireLocked();
  JobSeries& series = jobs_[job_id];
  const std::string rank = absl::StrCat(s.rank());
  auto set = [&](Family<Gauge>* family, const std::string& name, double value,
                 std::map<std::string, std::string> labels) {
    const std::string key = absl::StrCat(
        name, "|", rank, "|", labels.count("phase") ? labels["phase"] : "");
    auto it = series.by_key.find(key);
    if (it == series.by_key.end()) {
      labels["job_id"] = job_id;
      Gauge* g = &family->Add(labels);
      series.gauges.emplace_back(family, g);
      it = series.by_key.emplace(key, g).first;
    }
    it->second->Set(value);
  };
  const std::map<std::string, std::string> by_rank = {{"rank", rank}};
  Families& f = *f_;
  if (s.knn_top1() >= 0) {
    set(f.knn_top1, "knn", s.knn_top1(), by_rank);
    // A sample after an evaluation repeats the last step's values.
  }
  set(f.loss, "loss", s.loss(), by_rank);
  set(f.learning_rate, "lr", s.learning_rate(), by_rank);
  set(f.images_per_second, "ips", s.images_per_second(), by_rank);
  const std::pair<const char*, double> phases[] = {
      {"data", s.data_seconds()},
      {"forward", s.forward_seconds()},
      {"backward", s.backward_seconds()},
      {"communication", s.communication_seconds()},
      {"optimizer", s.optimizer_seconds()}};
  for (const auto& [phase, value] : phases) {
    set(f.phase_seconds, "phase", value, {{"rank", rank}, {"phase", phase}});
  }
  set(f.positive_logit, "pos", s.positive_logit_mean(), by_rank);
  set(f.negative_logit, "neg", s.negative_logit_mean(), by_rank);
  set(f.feature_std_mean, "stdmean", s.feature_std_mean(), by_rank);
  set(f.feature_std_min, "stdmin", s.feature_std_min(), by_rank);
  set(f.queue_staleness, "stale",
      static_cast<double>(s.queue_staleness_steps()), by_rank);
  set(f.epoch, "epoch", s.epoch(), by_rank);
  set(f.progress, "progress", s.fraction(), by_rank);
  set(f.step, "step", static_cast<double>(s.step()), by_rank);
  if (s.eta_seconds() >= 0) set(f.eta, "eta", s.eta_seconds(), by_rank);
  // 0 until the coordinator says otherwise (SetStraggler).
  if (!series.by_key.count(absl::StrCat("straggler|", rank, "|"))) {
    set(f.straggler, "straggler", 0, by_rank);
  }
}

void ServerMetrics::SetStraggler(const std::string& job_id, int64_t rank,
                                 bool straggling) {
  absl::MutexLock lock(&mu_);
  JobSeries& series = jobs_[job_id];
  const std::string key = absl::StrCat("straggler|", rank, "|");
  auto it = series.by_key.find(key);
  if (it == series.by_key.end()) {
    Gauge* g =
        &f_->straggler->Add({{"job_id", job_id}, {"rank", absl::StrCat(rank)}});
    series.gauges.emplace_back(f_->straggler, g);
    it = series.by_key.emplace(key, g).first;
  }
  it->second->Set(straggling ? 1 : 0);
}

void ServerMetrics::SetJobs(const std::map<v1::JobState, int64_t>& by_state) {
  absl::MutexLock lock(&mu_);
  for (const auto& [state, n] : by_state) {
    f_->jobs->Add({{"state", StateName(state)}}).Set(static_cast<double>(n));
  }
}

void ServerMetrics::SetSlots(int64_t used, int64_t free) {
  absl::MutexLock lock(&mu_);
  ExpireLocked();
  SetUsedFree(f_->slots, used, free);
}

void ServerMetrics::SetGpus(int64_t used, int64_t free) {
  absl::MutexLock lock(&mu_);
  SetUsedFree(f_->gpus, used, free);
}

void ServerMetrics::AddRestart(const std::string& reason) {
  (void)reason;
  absl::MutexLock lock(&mu_);
  f_->restarts->Add({}).Increment();
}

void ServerMetrics::SetJobState(const std::string& job_id, v1::JobState state) {
  absl::MutexLock lock(&mu_);
  JobSeries& series = jobs_[job_id];
  // PENDING only ever comes first: a submission that reports it after the
  // scheduler already started the job changes nothing.
  if (series.state != nullptr && state == v1::JOB_STATE_PENDING) return;
  if (series.state != nullptr) {
    f_->job_state->Remove(series.state);
    series.gauges.erase(
        std::remove_if(
            series.gauges.begin(), series.gauges.end(),
            [&](const auto& fg) { return fg.second == series.state; }),
        series.gauges.end());
  }
  series.state =
      &f_->job_state->Add({{"job_id", job_id}, {"state", StateName(state)}});
  series.state->Set(1);
  series.gauges.emplace_back(f_->job_state, series.state);
  if (IsFinal(state) && !series.has_ended) {
    series.has_ended = true;
    series.ended = std::chrono::steady_clock::now();
  }
  ExpireLocked();
}

void ServerMetrics::JobEnded(const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) return;
  it->second.has_ended = true;
  it->second.ended = std::chrono::steady_clock::now();
  ExpireLocked();
}

void ServerMetrics::ExpireLocked() {
  const auto now = std::chrono::steady_clock::now();
  for (auto it = jobs_.begin(); it != jobs_.end();) {
    if (it->second.has_ended && now - it->second.ended >= retention_) {
      for (auto& [family, gauge] : it->second.gauges) family->Remove(gauge);
      it = jobs_.erase(it);
    } else {
      ++it;
    }
  }
}

void ServerMetrics::OnRpc(const std::string& method, const std::string& code,
                          double seconds) {
  absl::MutexLock lock(&mu_);
  ExpireLocked();
  f_->rpcs->Add({{"method", method}, {"code", code}}).Increment();
  RpcHistogramLocked(method)->Observe(seconds);
}

prometheus::Histogram* ServerMetrics::RpcHistogramLocked(
    const std::string& method) {
  auto it = f_->rpc_histograms.find(method);
  if (it == f_->rpc_histograms.end()) {
    Histogram* h = &f_->rpc_seconds->Add(
        {{"method", method}},
        Histogram::BucketBoundaries{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                    0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10});
    it = f_->rpc_histograms.emplace(method, h).first;
  }
  return it->second;
}

}  // namespace momentum::server
