// CPU kernels of the fused sequence log-ratio + policy loss (math in seq_logratio.h).
//
// Parallel over sequences with OpenMP: a sequence is reduced by one thread, in an order fixed by the code (vector
// lanes, then chunks, then lanes combined), so every per-sequence result is bit-identical whatever the thread
// count (determinism, DESIGN.md §5). Sequences are scheduled dynamically: response lengths vary a lot.
//
// Accumulation is in double for every input type: it costs little here (the loops are bound by memory traffic
// and exp), and it makes a sum over a 32k-token response as accurate as torch's pairwise float32 sum. Outputs
// are stored in the accumulation type of the contract (float32 for float32/bfloat16/float16 tokens, float64
// for float64).
//
// The token loops are branch-free and vectorized (`omp simd`, exps from vexp.h). This file is compiled twice:
// as is (baseline x86-64 / any CPU), and by seq_logratio_avx2.cpp for AVX2+FMA, picked at run time by the
// entry points at the bottom (LUSPO_CPU_ISA=base forces the baseline). The two builds round differently in the
// last bits (FMA, lane count); each is deterministic.
#include <string.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <vector>

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

// Phase-1 loop of one sequence; kTisCol: 0 none, 1 Σ m (old − rollout), 2 Σ m·w_t (token TIS weight).
template <bool kDelta, int kTisCol, class scalar_t, class mask_t>
void phase1_loop(int64_t begin, int64_t end, const scalar_t* lp, const scalar_t* old, const scalar_t* ro,
                 const mask_t* mask, const LossParams& p, double* out) {
  double s_delta = 0, s_mask = 0, s_tis = 0;
#pragma omp simd reduction(+ : s_delta, s_mask, s_tis)
  for (int64_t t = begin; t < end; ++t) {
    const double m = to_acc(mask[t]);
    const bool valid = m != 0;  // masked tokens are selected away: garbage there never reaches a sum
    s_mask += m;
    if (kDelta) s_delta += valid ? m * (to_acc(lp[t]) - to_acc(old[t])) : 0.0;
    if (kTisCol == 1) s_tis += valid ? m * (to_acc(old[t]) - to_acc(ro[t])) : 0.0;
    if (kTisCol == 2) {
      s_tis += valid ? m * token_tis_weight<double>(p, to_acc(old[t]), to_acc(ro[t])) : 0.0;
    }
  }
  out[kSumDelta] = s_delta;
  out[kSumMask] = s_mask;
  out[kSumTis] = s_tis;
}

template <class scalar_t, class mask_t>
using Phase1Loop = void (*)(int64_t, int64_t, const scalar_t*, const scalar_t*, const scalar_t*, const mask_t*,
                            const LossParams&, double*);

template <bool kDelta, class scalar_t, class mask_t>
Phase1Loop<scalar_t, mask_t> pick_phase1(int tis_col) {
  if (tis_col == 1) return &phase1_loop<kDelta, 1, scalar_t, mask_t>;
  if (tis_col == 2) return &phase1_loop<kDelta, 2, scalar_t, mask_t>;
  return &phase1_loop<kDelta, 0, scalar_t, mask_t>;
}

template <class scalar_t, class mask_t, class out_t>
void phase1_impl(const Problem& pr, out_t* sums) {
  const LossParams p = pr.params;
  const int k = num_sum_cols(p);
  const int tis_col = is_sequence_tis(p.tis) ? 1 : (k == 3 ? 2 : 0);
  // grpo needs only n_i (its ratio is per token), so it skips reading logp and old_logp here.
  const Phase1Loop<scalar_t, mask_t> loop = p.loss != Loss::kGrpo ? pick_phase1<true, scalar_t, mask_t>(tis_col)
                                                                   : pick_phase1<false, scalar_t, mask_t>(tis_col);
  const auto* lp = static_cast<const scalar_t*>(pr.logp);
  const auto* old = static_cast<const scalar_t*>(pr.old_logp);
  const auto* ro = static_cast<const scalar_t*>(pr.rollout_logp);
  const auto* mask = static_cast<const mask_t*>(pr.mask);
  const int64_t* cu = pr.cu_seqlens;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t i = 0; i < pr.num_seqs; ++i) {
    double row[3];
    loop(cu[i], cu[i + 1], lp, old, ro, mask, p, row);
    for (int j = 0; j < k; ++j) store(sums + i * k + j, row[j]);
  }
}

// Phase 2 runs over chunks of a sequence: the chunk's inputs are first converted to float64 buffers (so the
// math below is compiled once per loss variant, not once per dtype as well), then one branch-free loop does
// the math for the whole chunk, then the gradient is converted back. The buffers stay in L1.
constexpr int64_t kChunk = 512;

struct ChunkBuffers {
  double m[kChunk], lp[kChunk], old[kChunk], ro[kChunk], ref[kChunk], adv[kChunk], grad[kChunk];
};

// The math of one chunk, specialised at compile time on the loss family, the TIS level and mode and the KL
// estimator, so that every branch of token_step on a parameter folds away and the loop is vectorized (exps
// included, vexp.h). A masked token is computed like any other and then selected away, so garbage log-probs
// there (inf, NaN) never reach a sum or the gradient. The lanes' partial sums are combined in a fixed order:
// deterministic.
template <Loss kLoss, Tis kTis, TisMode kMode, Kl kKl>
void chunk_math(const LossParams& params, const SeqCoef<double>& coef, int64_t n, ChunkBuffers& b, double* sums) {
  const SeqCoef<double> c = coef;
  LossParams p = params;
  p.loss = kLoss;
  p.tis = kTis;
  p.tis_mode = kMode;
  p.kl = kKl;
  p.per_token_adv = true;  // b.adv holds Â_i in every slot when the advantages are per sequence
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0, s8 = 0, s9 = 0, r_max = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3, s4, s5, s6, s7, s8, s9) reduction(max : r_max)
  for (int64_t j = 0; j < n; ++j) {
    const bool valid = b.m[j] != 0;
    const TokenTerms<double> tt = token_step<double>(p, c, b.m[j], b.lp[j], b.old[j], b.ro[j], b.ref[j], b.adv[j]);
    s0 += valid ? tt.pg_loss : 0.0;  // the TableCol order
    s1 += valid ? tt.kl_loss : 0.0;
    s2 += valid ? tt.tokens : 0.0;
    s3 += valid ? tt.abs_delta : 0.0;
    s4 += valid ? tt.clipped_tokens : 0.0;
    s5 += valid ? tt.tis_weight : 0.0;
    s6 += valid ? tt.tis_truncated : 0.0;
    s7 += valid ? tt.tis_masked : 0.0;
    s8 += valid ? tt.kl : 0.0;
    s9 += valid ? tt.grad_abs : 0.0;
    const double r = valid ? tt.tis_ratio : 0.0;
    r_max = r > r_max ? r : r_max;
    b.grad[j] = valid ? tt.grad : 0.0;
  }
  static_assert(kNumTokenSums == 10 && kNumTokenCols == 11, "one accumulator per token column");
  sums[0] += s0;
  sums[1] += s1;
  sums[2] += s2;
  sums[3] += s3;
  sums[4] += s4;
  sums[5] += s5;
  sums[6] += s6;
  sums[7] += s7;
  sums[8] += s8;
  sums[9] += s9;
  sums[kTisRatioMax] = r_max > sums[kTisRatioMax] ? r_max : sums[kTisRatioMax];
}

using ChunkMath = void (*)(const LossParams&, const SeqCoef<double>&, int64_t, ChunkBuffers&, double*);

template <Loss kLoss, Tis kTis, TisMode kMode>
ChunkMath pick_kl(Kl kl) {
  switch (kl) {
    case Kl::kK1: return &chunk_math<kLoss, kTis, kMode, Kl::kK1>;
    case Kl::kK2: return &chunk_math<kLoss, kTis, kMode, Kl::kK2>;
    case Kl::kK3: return &chunk_math<kLoss, kTis, kMode, Kl::kK3>;
    default: return &chunk_math<kLoss, kTis, kMode, Kl::kNone>;
  }
}

template <Loss kLoss>
ChunkMath pick_tis(Tis tis, TisMode mode, Kl kl) {
  switch (tis) {
    case Tis::kToken:
      return mode == TisMode::kMask ? pick_kl<kLoss, Tis::kToken, TisMode::kMask>(kl)
                                    : pick_kl<kLoss, Tis::kToken, TisMode::kTruncate>(kl);
    // Sequence and geometric weights are per sequence (SeqCoef): the token loop only reads w_i, so one
    // instantiation serves both levels and both modes.
    case Tis::kSequence:
    case Tis::kGeometric: return pick_kl<kLoss, Tis::kSequence, TisMode::kTruncate>(kl);
    default: return pick_kl<kLoss, Tis::kNone, TisMode::kTruncate>(kl);
  }
}

ChunkMath pick_chunk_math(const LossParams& p) {
  // gspo and luspo share a loop: they differ only in α_i, which is in the sequence coefficients.
  if (is_sequence_level(p.loss)) return pick_tis<Loss::kLuspo>(p.tis, p.tis_mode, p.kl);
  if (p.loss == Loss::kGrpo) return pick_tis<Loss::kGrpo>(p.tis, p.tis_mode, p.kl);
  return pick_tis<Loss::kGspoToken>(p.tis, p.tis_mode, p.kl);
}

// Load one chunk into the float64 buffers (only the arrays this variant reads).
template <class scalar_t, class mask_t, class out_t>
void load_chunk(const LossParams& p, int64_t c0, int64_t n, const scalar_t* lp, const scalar_t* old, const scalar_t* ro,
                const scalar_t* ref, const mask_t* mask, const out_t* adv, double adv_seq, ChunkBuffers& b) {
  for (int64_t j = 0; j < n; ++j) b.m[j] = to_acc(mask[c0 + j]);
  for (int64_t j = 0; j < n; ++j) b.lp[j] = to_acc(lp[c0 + j]);
  for (int64_t j = 0; j < n; ++j) b.old[j] = to_acc(old[c0 + j]);
  if (p.tis == Tis::kToken) {
    for (int64_t j = 0; j < n; ++j) b.ro[j] = to_acc(ro[c0 + j]);
  }
  if (p.kl != Kl::kNone) {
    for (int64_t j = 0; j < n; ++j) b.ref[j] = to_acc(ref[c0 + j]);
  }
  if (p.per_token_adv) {
    for (int64_t j = 0; j < n; ++j) b.adv[j] = double(adv[c0 + j]);
  } else {
    for (int64_t j = 0; j < n; ++j) b.adv[j] = adv_seq;
  }
}

template <class scalar_t, class mask_t, class out_t>
void phase2_impl(const Problem& pr, const out_t* sums, out_t* table, scalar_t* grad, const out_t* grad_scale) {
  const LossParams p = pr.params;
  const int k = num_sum_cols(p);
  const int64_t B = pr.num_seqs;
  const int64_t* cu = pr.cu_seqlens;
  const auto* lp = static_cast<const scalar_t*>(pr.logp);
  const auto* old = static_cast<const scalar_t*>(pr.old_logp);
  const auto* ro = static_cast<const scalar_t*>(pr.rollout_logp);
  const auto* ref = static_cast<const scalar_t*>(pr.ref_logp);
  const auto* mask = static_cast<const mask_t*>(pr.mask);
  const auto* adv = static_cast<const out_t*>(pr.advantages);
  const double scale = grad_scale ? double(*grad_scale) : 1.0;
  const ChunkMath math = pick_chunk_math(p);

  // Call-global normalisers (N, L_max) from the global sums, serially: B values, fixed order.
  double sum_len = 0, max_len = 0;
  for (int64_t i = 0; i < B; ++i) {
    const double n = sums[i * k + kSumMask];
    sum_len += n;
    max_len = std::max(max_len, n);
  }
  const Globals<double> globals = make_globals<double>(p, sum_len, max_len);

#pragma omp parallel
  {
    std::vector<ChunkBuffers> buffers(1);  // per thread, on the heap (56 KiB)
    ChunkBuffers& b = buffers[0];
    // Unused inputs read as 0 (never NaN from uninitialised memory, even in lanes that are selected away).
    std::fill(std::begin(b.ro), std::end(b.ro), 0.0);
    std::fill(std::begin(b.ref), std::end(b.ref), 0.0);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < B; ++i) {
      double row[3];
      for (int j = 0; j < k; ++j) row[j] = sums[i * k + j];
      const double adv_seq = p.per_token_adv ? 0.0 : double(adv[i]);
      const SeqCoef<double> c = sequence_coefficients<double>(p, row, k, adv_seq, globals);
      double out[kNumTableCols] = {};
      for (int64_t c0 = cu[i]; c0 < cu[i + 1]; c0 += kChunk) {
        const int64_t n = std::min(kChunk, cu[i + 1] - c0);
        load_chunk(p, c0, n, lp, old, ro, ref, mask, adv, adv_seq, b);
        math(p, c, n, b, out);
        if (grad) {
          for (int64_t j = 0; j < n; ++j) store(grad + c0 + j, b.grad[j] * scale);
        }
      }
      sequence_table_cols<double>(p, c, out);
      for (int j = 0; j < kNumTableCols; ++j) store(table + i * kNumTableCols + j, out[j]);
    }
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

#if defined(LUSPO_CPU_VARIANT_AVX2)
// Compiled from seq_logratio_avx2.cpp with AVX2+FMA code generation.
void phase1_cpu_avx2(const Problem& prob, void* sums) { dispatch<Phase1>(prob, sums); }
void phase2_cpu_avx2(const Problem& prob, const void* sums, void* table, void* grad, const void* grad_scale) {
  dispatch<Phase2>(prob, sums, table, grad, grad_scale);
}
#else
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LUSPO_HAVE_AVX2_BUILD 1
void phase1_cpu_avx2(const Problem& prob, void* sums);
void phase2_cpu_avx2(const Problem& prob, const void* sums, void* table, void* grad, const void* grad_scale);
#endif

namespace {
// The AVX2+FMA build when this CPU has both, unless LUSPO_CPU_ISA=base (read per call: tests flip it).
bool use_avx2() {
#if defined(LUSPO_HAVE_AVX2_BUILD)
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const char* isa = getenv("LUSPO_CPU_ISA");
  return supported && !(isa && strcmp(isa, "base") == 0);
#else
  return false;
#endif
}
}  // namespace

void phase1_cpu(const Problem& prob, void* sums) {
#if defined(LUSPO_HAVE_AVX2_BUILD)
  if (use_avx2()) return phase1_cpu_avx2(prob, sums);
#endif
  dispatch<Phase1>(prob, sums);
}

void phase2_cpu(const Problem& prob, const void* sums, void* table, void* grad, const void* grad_scale) {
#if defined(LUSPO_HAVE_AVX2_BUILD)
  if (use_avx2()) return phase2_cpu_avx2(prob, sums, table, grad, grad_scale);
#endif
  dispatch<Phase2>(prob, sums, table, grad, grad_scale);
}

const char* cpu_isa() { return use_avx2() ? "avx2" : "base"; }
#endif

}  // namespace luspo
