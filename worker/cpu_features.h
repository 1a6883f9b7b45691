// What the CPU can run, for the hand-written kernels (direct_conv.h,
// winograd.h, gemm.h, conv_weights.h): AVX-512F with FMA, asked once.
#ifndef MOMENTUM_WORKER_CPU_FEATURES_H_
#define MOMENTUM_WORKER_CPU_FEATURES_H_

namespace momentum::worker {

// Whether this CPU runs AVX-512F and FMA; false on builds for other
// architectures.
inline bool CpuHasAvx512() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool has =
      __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

}  // namespace momentum::worker

#endif  // MOMENTUM_WORKER_CPU_FEATURES_H_
