// exp and expm1 in float64 for the CPU kernels, written so that the compiler vectorizes the loops that call
// them. Why not libm: glibc's exp is scalar (≈ 7 ns per call here, the whole cost of a grpo token); its
// vector variants (libmvec) are only declared under -ffast-math, which would also let the compiler assume
// no NaN/inf and break the padding and clip-range guarantees; the SLEEF copy inside libtorch is not
// exported to extensions. So: Cody–Waite range reduction and a Taylor polynomial, branch-free.
//
//   exp(x)   = 2^k · e^r,  k = round(x / ln 2),  r = x − k·ln 2 (ln 2 split in two parts, exact k·ln2_hi),
//              |r| ≤ ln2/2 ≈ 0.347, e^r − 1 to degree 13: truncation r^14/14! < 4e-18, total error ≈ 1 ulp.
//   expm1(x) = 2^k·(e^r − 1) + (2^k − 1) from the same reduction (one polynomial for both), ≈ 1–2 ulp.
// Overflow (x > ln DBL_MAX ≈ 709.78) gives +inf; x < −708 gives exp 0 (exact would be a subnormal ≤ 3.3e-308)
// and expm1 −1; NaN stays NaN.
// Host only: the CUDA kernels use the device's exp/expm1.
#pragma once

#include <stdint.h>
#include <string.h>

// Always inlined: a call inside the token loops would stop the vectorizer.
#if defined(__GNUC__)
#define LUSPO_VEC_INLINE inline __attribute__((always_inline))
#else
#define LUSPO_VEC_INLINE inline
#endif

#ifndef LUSPO_ISA
#define LUSPO_ISA base  // the instruction-set variant being compiled (seq_logratio_avx2.cpp sets avx2)
#endif

namespace luspo {
inline namespace LUSPO_ISA {

// Shared core: clamps x to [−708, ln DBL_MAX], reduces it to x = k·ln2 + r, returns e^r − 1 (Horner, degree 13)
// and sets half_scale = 2^(k−1) (k ≤ 1024, so 2^k itself could overflow).
LUSPO_VEC_INLINE double exp_reduced(double x, double& half_scale) {
  const double log2e = 1.4426950408889634;
  const double ln2_hi = 6.93147180369123816490e-01;  // 32 significant bits: k·ln2_hi is exact for |k| < 2^20
  const double ln2_lo = 1.90821492927058770002e-10;
  const double shifter = 6755399441055744.0;         // 1.5·2^52: adding it rounds to an integer in the low bits
  const double max_arg = 709.782712893384;           // ln(DBL_MAX)
  const double xc = x < -708.0 ? -708.0 : (x > max_arg ? max_arg : x);
  const double biased = xc * log2e + shifter;
  const double k = biased - shifter;
  const double r = (xc - k * ln2_hi) - k * ln2_lo;  // exact r = x when k = 0
  double p = 1.0 / 6227020800.0;                     // 1/13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  // The low bits of `biased` hold k (two's complement, −1021 ≤ k ≤ 1024): 2^(k−1) is (k + 1022) << 52.
  uint64_t bits;
  memcpy(&bits, &biased, sizeof bits);
  bits = (bits + 1022u) << 52;
  memcpy(&half_scale, &bits, sizeof half_scale);
  return p * r;
}

// e^x = 2^k·(1 + (e^r − 1)), scaled by 2^(k−1) then 2.
LUSPO_VEC_INLINE double vexp(double x) {
  double half_scale;
  const double em1 = exp_reduced(x, half_scale);
  double result = (half_scale * (em1 + 1.0)) * 2.0;
  result = x > 709.782712893384 ? __builtin_inf() : result;
  result = x < -708.0 ? 0.0 : result;
  return x != x ? x : result;
}

// e^x − 1 = 2^k·(e^r − 1) + (2^k − 1), written as (2^(k−1)·(e^r − 1) + (2^(k−1) − ½))·2: one rounding in the
// sum (2^(k−1) − ½ is exact for every k that matters), no cancellation near 0 (k = 0 gives e^r − 1 itself).
LUSPO_VEC_INLINE double vexpm1(double x) {
  double half_scale;
  const double em1 = exp_reduced(x, half_scale);
  double result = (half_scale * em1 + (half_scale - 0.5)) * 2.0;
  result = x > 709.782712893384 ? __builtin_inf() : result;
  result = x < -708.0 ? -1.0 : result;
  return x != x ? x : result;
}

}  // namespace LUSPO_ISA
}  // namespace luspo
