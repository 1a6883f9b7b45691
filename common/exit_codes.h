// How momentum-worker's exit code tells its supervisor what to do.
#ifndef MOMENTUM_COMMON_EXIT_CODES_H_
#define MOMENTUM_COMMON_EXIT_CODES_H_

namespace momentum {

// Trained to the end (or, for rank 0 of a finished job, summarized).
inline constexpr int kExitOk = 0;
// Failed in a way another attempt may not (a lost peer, I/O, a timeout):
// the coordinator restarts the gang while restarts are left.
inline constexpr int kExitFailed = 1;
// The rank's input is wrong (the spec, the data path, the flags): another
// attempt would fail the same way, so the job fails at once.
inline constexpr int kExitBadInput = 2;
// Stopped by SIGTERM or SIGINT after writing a checkpoint (128 + 15).
inline constexpr int kExitStopped = 143;

}  // namespace momentum

#endif  // MOMENTUM_COMMON_EXIT_CODES_H_
