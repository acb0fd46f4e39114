// Fused per-sequence log-ratio reduction + policy loss on packed (THD) sequences (DESIGN.md §2).
//
// Torch-free on purpose: this header is included by the CPU kernels (seq_logratio.cpp), by the CUDA
// kernels (seq_logratio_cuda.cu, which `nvcc -c` must compile with no torch on the include path) and by
// the torch bindings (bindings.cpp). The per-sequence and per-token math lives here once, as
// __host__ __device__ inline functions, so the CPU and CUDA kernels cannot drift apart.
//
// Notation (sequence i, packed token t): m_t mask, δ_t = logp_t − old_logp_t, n_i = |y_i| = Σ_t m_t,
// Â advantage (per sequence, or per token for grpo / gspo_token), B the GLOBAL sequence count.
//
// Phase 1 (one pass over the tokens) gives, per sequence, the partial sums
//     col 0  S_i = Σ_t m_t δ_t
//     col 1  n_i = Σ_t m_t
//     col 2  R_i = Σ_t m_t (old_t − rollout_t)             sequence- or geometric-level TIS
//            U_i = Σ_t m_t w_t (token weights below)        token TIS on a sequence-ratio loss
// With context parallelism these are summed over the CP group (one all-reduce of [B, k]) in between.
//
// Importance weights against the rollout engine (luspo_megatron/algorithms/tis.py), from log ρ:
//     token ρ_t = e^{old_t − rollout_t};  sequence ρ_i = e^{R_i};  geometric ρ_i = e^{R_i / max(n_i, 1)}
//     truncate  w = min(ρ, C);  mask  w = ρ if lo ≤ ρ ≤ C else 0
// with log ρ clamped above at kLogRatioMax before exp (finite in float32; exact for any C < e^80).
//
// Phase 2 (one pass over the tokens) uses the global sums. Every aggregation is a_t = m_t·α_i:
//     token-mean α = 1/N,  seq-mean-token-mean α_i = 1/(n_i B),  seq-mean-token-sum α = 1/B,
//     seq-mean-token-sum-norm α = 1/(B L_max)
// and the loss is L = Σ_t a_t (w_t·pg_t + β·KL_t). The gradient w.r.t. logp_t, written in the same pass:
//     grpo        r_t = e^{δ_t}:   g_t = −a_t w_t Â_t r_t · [not clipped_t]
//     gspo_token  value s_i, ∂/∂logp_t = s_i:   g_t = −a_t w_t Â_t s_i · [not clipped_t]
//     gspo/luspo  s_i = e^{S_i/n_i}, ∂s_i/∂logp_t = s_i m_t/n_i, and ℓ_i multiplies Σ_u a_u w_u =: W_i:
//                 g_t = −W_i Â_i s_i [not clipped_i] · m_t / n_i,
//                 W_i = α_i·n_i (no TIS), α_i·n_i·w_i (sequence / geometric TIS), α_i·U_i (token TIS)
//                 (luspo: α = 1/B, so g_t = −s_i Â_i m_t / B inside the clip range: length-unbiased)
//     KL (β > 0)  g_t += β a_t dKL/dlogp_t   with k1: 1, k2: logp − ref, k3: 1 − e^{ref−logp}
// Everything that needs other tokens of the sequence (s_i, n_i, W_i) is in the global sums, so the
// gradient written here is already that of the sum of every CP rank's loss (see ops/fused_policy_loss.py).
// Masked tokens (m_t = 0), empty sequences (n_i = 0) and padding outside cu_seqlens give exactly 0.
#pragma once

#include <math.h>
#include <stdint.h>

#include "vexp.h"

#if defined(__CUDACC__)
#define LUSPO_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define LUSPO_HD inline __attribute__((always_inline))  // inside the vectorized token loops, see vexp.h
#else
#define LUSPO_HD inline
#endif

namespace luspo {

enum class Loss : int32_t { kGrpo = 0, kGspo = 1, kGspoToken = 2, kLuspo = 3 };
enum class Agg : int32_t { kTokenMean = 0, kSeqMeanTokenMean = 1, kSeqMeanTokenSum = 2, kSeqMeanTokenSumNorm = 3 };
enum class Tis : int32_t { kNone = 0, kToken = 1, kSequence = 2, kGeometric = 3 };
enum class TisMode : int32_t { kTruncate = 0, kMask = 1 };
enum class Kl : int32_t { kNone = 0, kK1 = 1, kK2 = 2, kK3 = 3 };
// Element types of the raw buffers. Token arrays: float32/float64/bfloat16/float16; the mask may also be
// uint8 (a bool tensor viewed as bytes). Sums, table and advantages are in the accumulation type
// (float64 for float64 tokens, float32 otherwise).
enum class DType : int32_t { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3, kUInt8 = 4 };

struct LossParams {
  Loss loss = Loss::kLuspo;
  Agg agg = Agg::kSeqMeanTokenSum;
  Tis tis = Tis::kNone;
  Kl kl = Kl::kNone;  // kNone when there is no ref_logp (no KL metric either)
  TisMode tis_mode = TisMode::kTruncate;
  double eps_lo = 0.0, eps_hi = 0.0, tis_clip = 1.0, kl_coef = 0.0;
  double tis_lower = 0.0;      // lo of mask mode
  double num_sequences = 1.0;  // global B
  double num_tokens = -1.0;    // token-mean N; < 0: Σ_i n_i of this call (global over CP)
  double max_len = -1.0;       // L_max of seq-mean-token-sum-norm; < 0: max_i n_i of this call
  bool per_token_adv = false;
};

// Columns of the phase-1 sums [B, k].
enum SumCol : int { kSumDelta = 0, kSumMask = 1, kSumTis = 2 };
// Columns of the phase-2 per-sequence table [B, kNumTableCols]; the Python side sums them (in a fixed
// order, so the result is deterministic) into the metrics. Columns up to kGradAbs are sums over this
// rank's tokens, kTisRatioMax a max over them; the rest are per-sequence values, identical on every CP rank.
enum TableCol : int {
  kPgLoss = 0,       // Σ_t a_t w_t pg_t
  kKlLoss,           // Σ_t a_t β KL_t (0 when β = 0)
  kTokens,           // Σ_t m_t
  kAbsDelta,         // Σ_t m_t |δ_t|
  kClippedTokens,    // Σ_t m_t [clipped_t]   (sequence-level losses: the sequence's decision)
  kTisWeight,        // Σ_t m_t w_t
  kTisTruncated,     // Σ_t m_t [ρ_t > C]          (token-level TIS, truncate mode)
  kTisMasked,        // Σ_t m_t [ρ_t ∉ [lo, C]]    (token-level TIS, mask mode)
  kKl,               // Σ_t m_t KL_t
  kGradAbs,          // Σ_t |g_t| of the policy part (length-weight-share diagnostic)
  kTisRatioMax,      // max_{t: m_t ≠ 0} ρ_t, 0 if none   (token-level TIS)
  kSeqClipped,       // [clipped_i]·[n_i > 0]     (sequence-level losses)
  kNonEmpty,         // [n_i > 0]
  kSeqRatio,         // s_i·[n_i > 0]
  kSeqTisTruncated,  // [ρ_i > C]·[n_i > 0]          (sequence / geometric TIS, truncate mode)
  kSeqTisMasked,     // [ρ_i ∉ [lo, C]]·[n_i > 0]    (sequence / geometric TIS, mask mode)
  kSeqTisRatio,      // ρ_i·[n_i > 0]                (sequence / geometric TIS)
  kNumTableCols
};
// Columns [0, kNumTokenSums) are token sums; kTisRatioMax, right after them, is a token max.
constexpr int kNumTokenSums = kGradAbs + 1;
constexpr int kNumTokenCols = kTisRatioMax + 1;
// log ρ is clamped above here before exp (algorithms/tis.py LOG_RATIO_MAX): e^80 ≈ 5.5e34 < FLT_MAX.
constexpr double kLogRatioMax = 80.0;

// The math below is compiled once per CPU instruction set (baseline and AVX2+FMA, see seq_logratio_avx2.cpp);
// the inline namespace gives each build its own symbols, so the linker can never mix them up.
inline namespace LUSPO_ISA {

LUSPO_HD bool is_sequence_level(Loss loss) { return loss == Loss::kGspo || loss == Loss::kLuspo; }

LUSPO_HD bool is_sequence_tis(Tis tis) { return tis == Tis::kSequence || tis == Tis::kGeometric; }

LUSPO_HD int num_sum_cols(const LossParams& p) {
  const bool tis_col = is_sequence_tis(p.tis) || (p.tis == Tis::kToken && is_sequence_level(p.loss));
  return tis_col ? 3 : 2;
}

// Device code uses CUDA's exp; host code the vectorizable float64 versions of vexp.h (the CPU kernels
// compute in float64 for every input type).
LUSPO_HD float lexp(float x) { return expf(x); }
LUSPO_HD float lexpm1(float x) { return expm1f(x); }
LUSPO_HD double lexp(double x) {
#if defined(__CUDA_ARCH__)
  return exp(x);
#else
  return vexp(x);
#endif
}
LUSPO_HD double lexpm1(double x) {
#if defined(__CUDA_ARCH__)
  return expm1(x);
#else
  return vexpm1(x);
#endif
}
LUSPO_HD float lfabs(float x) { return fabsf(x); }
LUSPO_HD double lfabs(double x) { return fabs(x); }
template <class acc>
LUSPO_HD acc lmax(acc a, acc b) { return a > b ? a : b; }

// torch.clamp semantics, NaN propagates.
template <class acc>
LUSPO_HD acc clamp(acc x, acc lo, acc hi) { return x < lo ? lo : (x > hi ? hi : x); }

template <class acc>
struct Surrogate {
  acc loss;      // −min(ratio·Â, clip(ratio)·Â)
  bool clipped;  // the clipped branch is selected, so the ratio gets no gradient
};

// PPO's pessimistic clipped surrogate, with the same tie rule as losses.clipped_surrogate (the clipped
// branch only when strictly larger), so the gradient is that of the selected branch.
template <class acc>
LUSPO_HD Surrogate<acc> clipped_surrogate(acc ratio, acc adv, acc eps_lo, acc eps_hi) {
  const acc unclipped = -ratio * adv;
  const acc clipped = -clamp<acc>(ratio, acc(1) - eps_lo, acc(1) + eps_hi) * adv;
  const bool active = clipped > unclipped;
  return {active ? clipped : unclipped, active};
}

// One importance weight from log ρ (tis.py tis_weights): ρ = e^{min(log ρ, kLogRatioMax)} (NaN stays NaN),
// truncate w = min(ρ, C), mask w = ρ on [lo, C] else 0. Branch-free selects (vectorizable).
template <class acc>
struct TisTerm {
  acc w;          // the weight
  acc ratio;      // ρ before truncation / masking
  acc truncated;  // 1: truncate mode and ρ > C
  acc masked;     // 1: mask mode and ρ ∉ [lo, C]
};

template <class acc>
LUSPO_HD TisTerm<acc> tis_term(acc log_ratio, bool mask_mode, acc clip, acc lower) {
  const acc x = log_ratio > acc(kLogRatioMax) ? acc(kLogRatioMax) : log_ratio;
  const acc e = lexp(x);
  const bool above = e > clip;
  const bool out = above || e < lower;  // inclusive bounds: e = lo or e = C is kept
  TisTerm<acc> t;
  t.ratio = e;
  t.truncated = (!mask_mode && above) ? acc(1) : acc(0);
  t.masked = (mask_mode && out) ? acc(1) : acc(0);
  t.w = mask_mode ? (out ? acc(0) : e) : (above ? clip : e);
  return t;
}

// Token TIS weight w_t from old_t − rollout_t under the call's mode.
template <class acc>
LUSPO_HD acc token_tis_weight(const LossParams& p, acc old_logp, acc rollout_logp) {
  return tis_term<acc>(old_logp - rollout_logp, p.tis_mode == TisMode::kMask, acc(p.tis_clip), acc(p.tis_lower)).w;
}

// Normalisers that are global over the call (computed once from the global sums).
template <class acc>
struct Globals {
  acc num_tokens;  // N of token-mean, ≥ 1
  acc max_len;     // L_max of seq-mean-token-sum-norm, ≥ 1
};

template <class acc>
LUSPO_HD Globals<acc> make_globals(const LossParams& p, acc sum_len, acc max_len_seen) {
  const acc n = p.num_tokens >= 0 ? acc(p.num_tokens) : sum_len;
  const acc l = p.max_len > 0 ? acc(p.max_len) : max_len_seen;
  return {lmax<acc>(n, acc(1)), lmax<acc>(l, acc(1))};
}

// Everything per sequence that phase 2 needs, from the global sums row of sequence i.
template <class acc>
struct SeqCoef {
  acc n;        // n_i
  acc alpha;    // a_t = m_t·alpha
  acc s;        // s_i = exp(S_i / max(n_i, 1)); 1 for an empty sequence
  acc tis_w;    // sequence / geometric TIS weight w_i (1 otherwise)
  acc tis_ratio;      // its ρ_i (1 otherwise)
  acc tis_truncated;  // 0/1: ρ_i > C in truncate mode
  acc tis_masked;     // 0/1: ρ_i ∉ [lo, C] in mask mode
  acc adv;      // Â_i (unused with per-token advantages)
  acc loss;     // ℓ_i of a sequence-ratio loss
  bool clipped; // its clip decision
  acc clipped_f;  // the same as 0/1
  acc grad;     // sequence-ratio losses: g_t = grad·m_t
};

template <class acc>
LUSPO_HD SeqCoef<acc> sequence_coefficients(const LossParams& p, const acc* sums_row, int k, acc adv,
                                            Globals<acc> g) {
  SeqCoef<acc> c;
  c.n = sums_row[kSumMask];
  const acc n1 = lmax<acc>(c.n, acc(1));  // the reference's clamp(min=1): empty sequences give 0/1, never 0/0
  const acc B = acc(p.num_sequences);
  switch (p.agg) {
    case Agg::kTokenMean: c.alpha = acc(1) / g.num_tokens; break;
    case Agg::kSeqMeanTokenMean: c.alpha = acc(1) / (n1 * B); break;
    case Agg::kSeqMeanTokenSum: c.alpha = acc(1) / B; break;
    default: c.alpha = acc(1) / (B * g.max_len); break;
  }
  c.s = lexp(sums_row[kSumDelta] / n1);
  c.tis_w = acc(1);
  c.tis_ratio = acc(1);
  c.tis_truncated = acc(0);
  c.tis_masked = acc(0);
  if (is_sequence_tis(p.tis)) {
    // sequence: log ρ_i = R_i (Π_t ρ_t);  geometric: log ρ_i = R_i / |y_i|
    const acc log_rho = p.tis == Tis::kSequence ? sums_row[kSumTis] : sums_row[kSumTis] / n1;
    const TisTerm<acc> t =
        tis_term<acc>(log_rho, p.tis_mode == TisMode::kMask, acc(p.tis_clip), acc(p.tis_lower));
    c.tis_w = t.w;
    c.tis_ratio = t.ratio;
    c.tis_truncated = t.truncated;
    c.tis_masked = t.masked;
  }
  c.adv = adv;
  c.loss = acc(0);
  c.clipped = false;
  c.clipped_f = acc(0);
  c.grad = acc(0);
  if (is_sequence_level(p.loss)) {
    const Surrogate<acc> sur = clipped_surrogate<acc>(c.s, adv, acc(p.eps_lo), acc(p.eps_hi));
    c.loss = sur.loss;
    c.clipped = sur.clipped;
    c.clipped_f = sur.clipped ? acc(1) : acc(0);
    // W_i = Σ_{t∈i} a_t w_t over every CP rank's tokens.
    acc W;
    if (p.tis == Tis::kToken) {
      W = c.alpha * sums_row[kSumTis];
    } else {
      W = c.alpha * c.n * c.tis_w;
    }
    c.grad = sur.clipped ? acc(0) : -W * adv * c.s / n1;
  }
  (void)k;
  return c;
}

// What one response token contributes: ∂L/∂logp_t and its terms of the table columns kPgLoss..kTisRatioMax.
// A struct of scalars (not an array) so that the CPU loops keep it in vector registers.
template <class acc>
struct TokenTerms {
  acc grad;  // ∂L/∂logp_t, policy + KL part
  acc pg_loss, kl_loss, tokens, abs_delta, clipped_tokens, tis_weight, tis_truncated, tis_masked, kl, grad_abs;
  acc tis_ratio;  // ρ_t (token-level TIS; 0 otherwise): the kTisRatioMax candidate
};

// One response token (m ≠ 0: the callers drop masked tokens, so garbage log-probs there cannot produce
// inf·0 = NaN). Straight-line code apart from selects on loop-invariant parameters.
template <class acc>
LUSPO_HD TokenTerms<acc> token_step(const LossParams& p, const SeqCoef<acc>& c, acc m, acc lp, acc old, acc rollout,
                                    acc ref, acc adv_t) {
  TokenTerms<acc> out;
  const acc delta = lp - old;
  const acc a = m * c.alpha;
  // Scalars only below (no structs or out-pointers), and a select only on per-token conditions; per-sequence
  // flags enter as 0/1 multipliers: that is what the CPU vectorizer handles.
  acc w = acc(1), tis_truncated = acc(0), tis_masked = acc(0), tis_ratio = acc(0);
  if (p.tis == Tis::kToken) {
    const TisTerm<acc> t =
        tis_term<acc>(old - rollout, p.tis_mode == TisMode::kMask, acc(p.tis_clip), acc(p.tis_lower));
    w = t.w;
    tis_truncated = m * t.truncated;
    tis_masked = m * t.masked;
    tis_ratio = t.ratio;
  } else if (is_sequence_tis(p.tis)) {
    w = c.tis_w;  // counted per sequence (sequence_table_cols), not per token
  }
  acc pg, grad, clipped_tokens;
  if (is_sequence_level(p.loss)) {
    pg = c.loss;
    clipped_tokens = m * c.clipped_f;
    grad = c.grad * m;
  } else {
    const acc A = p.per_token_adv ? adv_t : c.adv;
    const acc ratio = p.loss == Loss::kGrpo ? lexp(delta) : c.s;
    // clipped_surrogate, inlined
    const acc unclipped = -ratio * A;
    const acc clipped_value = -clamp<acc>(ratio, acc(1) - acc(p.eps_lo), acc(1) + acc(p.eps_hi)) * A;
    const bool clipped = clipped_value > unclipped;
    pg = clipped ? clipped_value : unclipped;
    grad = clipped ? acc(0) : -a * w * A * ratio;
    clipped_tokens = clipped ? m : acc(0);
  }
  out.pg_loss = a * w * pg;
  out.grad_abs = lfabs(grad);
  out.tokens = m;
  out.abs_delta = m * lfabs(delta);
  out.clipped_tokens = clipped_tokens;
  out.tis_weight = m * w;
  out.tis_truncated = tis_truncated;
  out.tis_masked = tis_masked;
  out.tis_ratio = tis_ratio;
  out.kl = acc(0);
  out.kl_loss = acc(0);
  if (p.kl != Kl::kNone) {
    // log r = ref − logp (kl.py); dKL/dlogp below.
    const acc log_r = ref - lp;
    acc kl, dkl;
    if (p.kl == Kl::kK1) {
      kl = -log_r;
      dkl = acc(1);
    } else if (p.kl == Kl::kK2) {
      kl = acc(0.5) * log_r * log_r;
      dkl = -log_r;
    } else {
      const acc e = lexpm1(log_r);
      kl = e - log_r;
      dkl = -e;
    }
    out.kl = m * kl;
    // Unconditional (β = 0 adds exactly 0 for any finite KL_t): a branch on β would stop the CPU vectorizer.
    const acc beta = acc(p.kl_coef);
    out.kl_loss = a * beta * kl;
    grad += beta * a * dkl;
  }
  out.grad = grad;
  return out;
}

// sums[kPgLoss..kGradAbs] += the token's terms; sums[kTisRatioMax] = max(·, ρ_t).
template <class acc>
LUSPO_HD void add_token_terms(acc* sums, const TokenTerms<acc>& t) {
  sums[kPgLoss] += t.pg_loss;
  sums[kKlLoss] += t.kl_loss;
  sums[kTokens] += t.tokens;
  sums[kAbsDelta] += t.abs_delta;
  sums[kClippedTokens] += t.clipped_tokens;
  sums[kTisWeight] += t.tis_weight;
  sums[kTisTruncated] += t.tis_truncated;
  sums[kTisMasked] += t.tis_masked;
  sums[kKl] += t.kl;
  sums[kGradAbs] += t.grad_abs;
  sums[kTisRatioMax] = lmax<acc>(sums[kTisRatioMax], t.tis_ratio);
}

// Per-sequence table columns (identical on every CP rank).
template <class acc>
LUSPO_HD void sequence_table_cols(const LossParams& p, const SeqCoef<acc>& c, acc* row) {
  const acc nonempty = c.n > acc(0) ? acc(1) : acc(0);
  row[kSeqClipped] = (is_sequence_level(p.loss) && c.clipped) ? nonempty : acc(0);
  row[kNonEmpty] = nonempty;
  row[kSeqRatio] = c.s * nonempty;
  const acc seq_tis = is_sequence_tis(p.tis) ? nonempty : acc(0);
  row[kSeqTisTruncated] = c.tis_truncated * seq_tis;
  row[kSeqTisMasked] = c.tis_masked * seq_tis;
  row[kSeqTisRatio] = c.tis_ratio * seq_tis;
}

}  // namespace LUSPO_ISA

// ---- Entry points on raw buffers -------------------------------------------------------------------------

struct Problem {
  int64_t num_tokens = 0;              // T (packed, including padding)
  int64_t num_seqs = 0;                // B of this call
  const int64_t* cu_seqlens = nullptr; // [B+1], non-decreasing, cu[B] ≤ T
  DType token_dtype = DType::kFloat32; // logp, old_logp, rollout_logp, ref_logp
  DType mask_dtype = DType::kFloat32;  // token_dtype or kUInt8
  const void* logp = nullptr;
  const void* old_logp = nullptr;
  const void* rollout_logp = nullptr;  // needed when tis != kNone
  const void* ref_logp = nullptr;      // needed when kl != kNone
  const void* mask = nullptr;
  const void* advantages = nullptr;    // [B] or [T] (per_token_adv), accumulation type
  LossParams params;
};

// CPU (OpenMP over sequences). sums: [B, num_sum_cols] accumulation type.
void phase1_cpu(const Problem& prob, void* sums);
// table: [B, kNumTableCols]; grad: [T] token dtype or nullptr (metrics only); grad_scale: nullptr or one
// accumulation-type value multiplying the gradient (the backward's grad_output when recomputing).
void phase2_cpu(const Problem& prob, const void* sums, void* table, void* grad, const void* grad_scale);
// Which build of the CPU kernels the calls above run: "avx2" or "base".
const char* cpu_isa();

// CUDA (seq_logratio_cuda.cu). Buffers are device pointers (cu_seqlens too); `stream` is a cudaStream_t;
// `workspace` is a device buffer of phase*_cuda_workspace_bytes. Return nullptr, or the CUDA error string.
int64_t phase1_cuda_workspace_bytes(const Problem& prob, int device);
int64_t phase2_cuda_workspace_bytes(const Problem& prob, int device);
const char* phase1_cuda(const Problem& prob, void* sums, void* workspace, void* stream, int device);
const char* phase2_cuda(const Problem& prob, const void* sums, void* table, void* grad, const void* grad_scale,
                        void* workspace, void* stream, int device);

}  // namespace luspo
