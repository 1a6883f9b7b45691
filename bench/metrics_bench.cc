// metrics_bench: how long the coordinator's /metrics takes to answer with
// about 1,000 training series against the same endpoint with none, side by
// side in one run. The series come from real MetricSample messages through
// ServerMetrics::OnSample (19 series per job and rank); the scrapes are plain
// HTTP GETs over loopback, as Prometheus makes them.
//   metrics_bench [--series 1000] [--scrapes 200]

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "server/server_metrics.h"
#include "tests/http_get.h"

namespace {

using Clock = std::chrono::steady_clock;

// One GET /metrics; returns the body size, or -1.
int64_t Scrape(int port) {
  std::optional<std::string> body =
      momentum::testing::HttpGet(port, "/metrics");
  return body ? static_cast<int64_t>(body->size()) : -1;
}

struct Timing {
  double mean_ms = 0, p50_ms = 0, p99_ms = 0;
  int64_t bytes = 0;
};

Timing Measure(int port, int scrapes) {
  std::vector<double> ms;
  Timing t;
  for (int i = 0; i < scrapes; ++i) {
    const auto start = Clock::now();
    t.bytes = Scrape(port);
    ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - start)
                     .count());
  }
  std::sort(ms.begin(), ms.end());
  double sum = 0;
  for (double v : ms) sum += v;
  t.mean_ms = sum / ms.size();
  t.p50_ms = ms[ms.size() / 2];
  t.p99_ms = ms[std::min(ms.size() - 1, ms.size() * 99 / 100)];
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"/metrics response time with many training series"};
  int series = 1000, scrapes = 200;
  app.add_option("--series", series, "training series to create (about)");
  app.add_option("--scrapes", scrapes, "GETs per measurement");
  CLI11_PARSE(app, argc, argv);

  auto empty = momentum::server::ServerMetrics::Create(
      "127.0.0.1:0", std::chrono::seconds(300));
  auto full = momentum::server::ServerMetrics::Create(
      "127.0.0.1:0", std::chrono::seconds(300));
  if (!empty.ok() || !full.ok()) {
    std::cerr << "cannot serve /metrics\n";
    return 1;
  }
  constexpr int kSeriesPerRank = 19;
  const int ranks = (series + kSeriesPerRank - 1) / kSeriesPerRank;
  for (int i = 0; i < ranks; ++i) {
    momentum::v1::MetricSample s;
    s.set_rank(i % 4);
    s.set_step(100 + i);
    s.set_loss(5.0 - 0.001 * i);
    s.set_learning_rate(0.1);
    s.set_images_per_second(1000);
    s.set_data_seconds(0.001);
    s.set_forward_seconds(0.1);
    s.set_backward_seconds(0.15);
    s.set_communication_seconds(0.004);
    s.set_optimizer_seconds(0.01);
    s.set_knn_top1(0.8);
    s.set_eta_seconds(30);
    (*full)->OnSample("job-" + std::to_string(i / 4 + 1), s);
  }
  // Warm both endpoints, then measure them in turn.
  Measure((*empty)->port(), 10);
  Measure((*full)->port(), 10);
  const Timing a = Measure((*empty)->port(), scrapes);
  const Timing b = Measure((*full)->port(), scrapes);
  std::cout << nlohmann::json{{"training_series", ranks * kSeriesPerRank},
                              {"scrapes", scrapes},
                              {"empty_mean_ms", a.mean_ms},
                              {"empty_p99_ms", a.p99_ms},
                              {"empty_bytes", a.bytes},
                              {"full_mean_ms", b.mean_ms},
                              {"full_p50_ms", b.p50_ms},
                              {"full_p99_ms", b.p99_ms},
                              {"full_bytes", b.bytes},
                              {"ratio_full_to_empty", b.mean_ms / a.mean_ms}}
                   .dump()
            << std::endl;
  return 0;
}
