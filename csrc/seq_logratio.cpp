// CPU kernels of the fused sequence log-ratio + policy loss (math in seq_logratio.h).
//
// Parallel over sequences with OpenMP: a sequence is reduced by one thread, in token order, so every
// per-sequence result is bit-identical whatever the thread count (determinism, DESIGN.md §5). Sequences
// are scheduled dynamically because response lengths vary by orders of magnitude.
//
// Accumulation is in double for every input type. On the CPU this costs nothing measurable (the loops are
// bound by memory traffic and exp), and it makes one thread's sequential sum over a 32k-token response as
// accurate as torch's pairwise float32 sum; outputs are stored in the accumulation type of the contract
// (float32 for float32/bfloat16/float16 tokens, float64 for float64).
#include <string.h>

#include <algorithm>
#include <cstdint>

#include "seq_logratio.h"

namespace luspo {
namespace {

// Torch-free storage types for the 16-bit floats (bit patterns of torch's bfloat16 / float16).
struct BF16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};

inline double to_acc(float v) { return v; }
inline double to_acc(double v) { return v; }
inline double to_acc(uint8_t v) { return v; }
inline double to_acc(BF16 v) {
  const uint32_t u = uint32_t(v.bits) << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}
inline double to_acc(F16 v) {
  const uint32_t sign = uint32_t(v.bits & 0x8000u) << 16;
  const uint32_t exponent = (v.bits >> 10) & 0x1fu;
  const uint32_t mantissa = v.bits & 0x3ffu;
  uint32_t u;
  if (exponent == 0) {  // zero or subnormal: mantissa · 2^-24
    const float f = float(mantissa) * 5.9604644775390625e-8f;
    return sign ? -double(f) : double(f);
  } else if (exponent == 31) {  // inf / nan
    u = sign | 0x7f800000u | (mantissa << 13);
  } else {
    u = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  }
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

// Round-to-nearest-even stores, as torch's .to(bfloat16/float16).
inline void store(float* out, double v) { *out = float(v); }
inline void store(double* out, double v) { *out = v; }
inline void store(BF16* out, double v) {
  const float f = float(v);
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    out->bits = uint16_t((u >> 16) | 0x40u);  // quiet NaN
    return;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  out->bits = uint16_t(u >> 16);
}
inline void store(F16* out, double v) {
  const float f = float(v);
  uint32_t x;
  memcpy(&x, &f, sizeof x);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) {  // inf / nan
    out->bits = uint16_t(sign | 0x7c00u | (x > 0x7f800000u ? 0x200u : 0u));
  } else if (x >= 0x477ff000u) {  // ≥ 65520 rounds to inf
    out->bits = uint16_t(sign | 0x7c00u);
  } else if (x < 0x38800000u) {  // |f| < 2^-14: subnormal half; f·2^24 is exact, rint rounds half-even
    float af;
    memcpy(&af, &x, sizeof af);
    out->bits = uint16_t(sign | uint32_t(nearbyintf(af * 16777216.0f)));
  } else {  // normal: rebias the exponent (127 → 15), round the mantissa 23 → 10 bits half-even
    uint32_t r = x - (112u << 23);
    r += 0xfffu + ((r >> 13) & 1u);
    out->bits = uint16_t(sign | (r >> 13));
  }
}

template <class scalar_t, class mask_t, class out_t>
void phase1_impl(const Problem& pr, out_t* sums) {
  const LossParams& p = pr.params;
  const int k = num_sum_cols(p);
  const bool need_delta = p.loss != Loss::kGrpo;  // grpo needs only n_i
  const bool seq_tis = p.tis == Tis::kSequence;
  const bool token_tis_col = k == 3 && !seq_tis;
  const double clip = p.tis_clip;
  const auto* lp = static_cast<const scalar_t*>(pr.logp);
  const auto* old = static_cast<const scalar_t*>(pr.old_logp);
  const auto* ro = static_cast<const scalar_t*>(pr.rollout_logp);
  const auto* mask = static_cast<const mask_t*>(pr.mask);
  const int64_t* cu = pr.cu_seqlens;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t i = 0; i < pr.num_seqs; ++i) {
    double s_delta = 0, s_mask = 0, s_tis = 0;
    for (int64_t t = cu[i]; t < cu[i + 1]; ++t) {
      const double m = to_acc(mask[t]);
      if (m == 0) continue;
      s_mask += m;
      if (need_delta) s_delta += m * (to_acc(lp[t]) - to_acc(old[t]));
      if (seq_tis) {
        s_tis += m * (to_acc(old[t]) - to_acc(ro[t]));
      } else if (token_tis_col) {
        bool truncated;
        s_tis += m * token_tis_weight<double>(to_acc(old[t]), to_acc(ro[t]), clip, &truncated);
      }
    }
    out_t* row = sums + i * k;
    store(row + kSumDelta, s_delta);
    store(row + kSumMask, s_mask);
    if (k == 3) store(row + kSumTis, s_tis);
  }
}

template <class scalar_t, class mask_t, class out_t>
void phase2_impl(const Problem& pr, const out_t* sums, out_t* table, scalar_t* grad, const out_t* grad_scale) {
  const LossParams& p = pr.params;
  const int k = num_sum_cols(p);
  const int64_t B = pr.num_seqs;
  const int64_t* cu = pr.cu_seqlens;
  const auto* lp = static_cast<const scalar_t*>(pr.logp);
  const auto* old = static_cast<const scalar_t*>(pr.old_logp);
  const auto* ro = static_cast<const scalar_t*>(pr.rollout_logp);
  const auto* ref = static_cast<const scalar_t*>(pr.ref_logp);
  const auto* mask = static_cast<const mask_t*>(pr.mask);
  const auto* adv = static_cast<const out_t*>(pr.advantages);
  const bool token_tis = p.tis == Tis::kToken;
  const bool kl = p.kl != Kl::kNone;
  const double scale = grad_scale ? double(*grad_scale) : 1.0;

  // Call-global normalisers (N, L_max) from the global sums, serially: B values, fixed order.
  double sum_len = 0, max_len = 0;
  for (int64_t i = 0; i < B; ++i) {
    const double n = sums[i * k + kSumMask];
    sum_len += n;
    max_len = std::max(max_len, n);
  }
  const Globals<double> globals = make_globals<double>(p, sum_len, max_len);

#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t i = 0; i < B; ++i) {
    double row[3];
    for (int j = 0; j < k; ++j) row[j] = sums[i * k + j];
    const SeqCoef<double> c =
        sequence_coefficients<double>(p, row, k, p.per_token_adv ? 0.0 : double(adv[i]), globals);
    double acc[kNumTokenCols] = {};
    for (int64_t t = cu[i]; t < cu[i + 1]; ++t) {
      const double m = to_acc(mask[t]);
      if (m == 0) {
        if (grad) store(grad + t, 0.0);
        continue;
      }
      const double g = token_step<double>(p, c, m, to_acc(lp[t]), to_acc(old[t]), token_tis ? to_acc(ro[t]) : 0.0,
                                          kl ? to_acc(ref[t]) : 0.0, p.per_token_adv ? double(adv[t]) : 0.0, acc);
      if (grad) store(grad + t, g * scale);
    }
    double out[kNumTableCols];
    for (int j = 0; j < kNumTokenCols; ++j) out[j] = acc[j];
    sequence_table_cols<double>(p, c, out);
    for (int j = 0; j < kNumTableCols; ++j) store(table + i * kNumTableCols + j, out[j]);
  }
  if (grad) {  // tokens outside every sequence (padding): gradient 0
    const int64_t begin = B ? cu[0] : pr.num_tokens, end = B ? cu[B] : pr.num_tokens;
    for (int64_t t = 0; t < begin; ++t) store(grad + t, 0.0);
    for (int64_t t = end; t < pr.num_tokens; ++t) store(grad + t, 0.0);
  }
}

// Dispatch on (token dtype, mask dtype); the accumulation type follows the token dtype.
template <template <class, class, class> class Kernel, class... Args>
void dispatch(const Problem& pr, Args... args) {
  const bool byte_mask = pr.mask_dtype == DType::kUInt8;
  switch (pr.token_dtype) {
    case DType::kFloat64:
      return byte_mask ? Kernel<double, uint8_t, double>::run(pr, args...)
                       : Kernel<double, double, double>::run(pr, args...);
    case DType::kFloat32:
      return byte_mask ? Kernel<float, uint8_t, float>::run(pr, args...)
                       : Kernel<float, float, float>::run(pr, args...);
    case DType::kBFloat16:
      return byte_mask ? Kernel<BF16, uint8_t, float>::run(pr, args...) : Kernel<BF16, BF16, float>::run(pr, args...);
    case DType::kFloat16:
      return byte_mask ? Kernel<F16, uint8_t, float>::run(pr, args...) : Kernel<F16, F16, float>::run(pr, args...);
    default:
      return;  // the bindings reject every other dtype before calling
  }
}

template <class scalar_t, class mask_t, class out_t>
struct Phase1 {
  static void run(const Problem& pr, void* sums) { phase1_impl<scalar_t, mask_t, out_t>(pr, static_cast<out_t*>(sums)); }
};

template <class scalar_t, class mask_t, class out_t>
struct Phase2 {
  static void run(const Problem& pr, const void* sums, void* table, void* grad, const void* grad_scale) {
    phase2_impl<scalar_t, mask_t, out_t>(pr, static_cast<const out_t*>(sums), static_cast<out_t*>(table),
                                         static_cast<scalar_t*>(grad), static_cast<const out_t*>(grad_scale));
  }
};

}  // namespace

void phase1_cpu(const Problem& prob, void* sums) { dispatch<Phase1>(prob, sums); }

void phase2_cpu(const Problem& prob, const void* sums, void* table, void* grad, const void* grad_scale) {
  dispatch<Phase2>(prob, sums, table, grad, grad_scale);
}

}  // namespace luspo
