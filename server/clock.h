// Time as the coordinator's rules see it: a steady clock for deadlines
// (restart back-off, hang and straggler checks) and the wall clock for the
// times stored with a job. Injected, so that tests advance time by hand
// (tests/server/fake_launcher.h has FakeClock) instead of sleeping.
//
//   const Clock& clock = Clock::Real();
//   const auto deadline = clock.Now() + std::chrono::seconds(5);
#ifndef MOMENTUM_SERVER_CLOCK_H_
#define MOMENTUM_SERVER_CLOCK_H_

#include <chrono>
#include <cstdint>

namespace momentum::server {

// Thread-safe: every implementation may be read from any thread.
class Clock {
 public:
  using TimePoint = std::chrono::steady_clock::time_point;
  virtual ~Clock() = default;
  // Monotonic time, for durations and deadlines.
  virtual TimePoint Now() const = 0;
  // Milliseconds since the Unix epoch, for the store's times.
  virtual int64_t WallMs() const = 0;

  // The process's clocks; lives forever.
  static const Clock& Real();
};

// `seconds` as a steady-clock duration (sub-nanosecond parts dropped).
inline std::chrono::steady_clock::duration Seconds(double seconds) {
  return std::chrono::duration_cast<std::chrono::steady_clock::duration>(
      std::chrono::duration<double>(seconds));
}

}  // namespace momentum::server

#endif  // MOMENTUM_SERVER_CLOCK_H_
