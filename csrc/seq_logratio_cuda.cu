// CUDA kernels of the fused sequence log-ratio + policy loss (math in seq_logratio.h).
//
// Torch-free: raw device pointers in, raw device pointers out, so `nvcc -c` alone compiles this file on any
// machine (tests/ops/test_cuda_source.py does, for sm_90a). bindings.cpp calls the launchers at the bottom
// with torch's current stream and a workspace from torch's caching allocator.
//
// Work decomposition: one thread block per (sequence, piece). Each sequence is cut into S equal pieces
// (S = 1 when there are enough sequences to fill the GPU), a block streams its piece with coalesced loads,
// reduces in float32 registers (float64 for float64 inputs), then through a fixed warp-shuffle tree and
// shared memory; a second tiny kernel adds the S piece results of every sequence in piece order.
// Why not a segmented warp reduction over fixed token tiles: RL responses are long (8k–32k tokens, the
// case this op exists for), so a block per sequence already streams thousands of tokens per reduction and
// the per-block reduction cost is negligible; a segmented scan pays its boundary bookkeeping on every
// tile and only wins when sequences are tens of tokens long. Why pieces: with B = 64 sequences, one
// block per sequence would leave half of an H100's 132 SMs idle; S pieces give ≥ 4 blocks per SM.
// Determinism: no atomics anywhere; every reduction has a fixed order for a given (T, B, device), so the
// same inputs give bit-identical outputs (S depends on the SM count, so a different GPU model may round
// differently in the last bit).
//
// Not run in CI (no GPU there): the per-token and per-sequence math is the shared, CPU-tested header; the
// decomposition above is what is GPU-specific.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "seq_logratio.h"

namespace luspo {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMinPieceTokens = 2048;  // below this a piece is not worth a block of its own
constexpr int kBlocksPerSm = 4;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(uint8_t v) { return float(v); }

__device__ __forceinline__ void store(float* out, float v) { *out = v; }
__device__ __forceinline__ void store(double* out, double v) { *out = v; }
__device__ __forceinline__ void store(__nv_bfloat16* out, float v) { *out = __float2bfloat16(v); }
__device__ __forceinline__ void store(__half* out, float v) { *out = __float2half(v); }

// a + b, or max(a, b) for the column that holds a maximum (kMaxLast: the last of the N).
template <class acc_t, int N, bool kMaxLast>
__device__ __forceinline__ acc_t reduce_op(int j, acc_t a, acc_t b) {
  return (kMaxLast && j == N - 1) ? (b > a ? b : a) : a + b;
}

// Sum (the last value: max, with kMaxLast) of N values over the block, in a fixed order (shuffle tree within
// warps, then warp 0 over the warps' partials). The result is valid in thread 0. Called once per kernel.
// Every value reduced by max is ≥ 0, so 0 is its neutral element.
template <class acc_t, int N, bool kMaxLast = false>
__device__ __forceinline__ void block_sum(acc_t (&v)[N]) {
  __shared__ acc_t partial[N][kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int j = 0; j < N; ++j) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      v[j] = reduce_op<acc_t, N, kMaxLast>(j, v[j], __shfl_down_sync(0xffffffffu, v[j], offset));
    }
    if (lane == 0) partial[j][warp] = v[j];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      v[j] = lane < kWarps ? partial[j][lane] : acc_t(0);
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) {
        v[j] = reduce_op<acc_t, N, kMaxLast>(j, v[j], __shfl_down_sync(0xffffffffu, v[j], offset));
      }
    }
  }
}

// Token range [lo, hi) of piece c of sequence i.
struct Piece {
  int64_t seq, lo, hi;
  int index;
};

__device__ __forceinline__ Piece piece_of_block(const int64_t* cu, int pieces) {
  Piece p;
  p.seq = blockIdx.x / pieces;
  p.index = int(blockIdx.x % pieces);
  const int64_t begin = cu[p.seq], len = cu[p.seq + 1] - begin;
  p.lo = begin + len * p.index / pieces;
  p.hi = begin + len * (p.index + 1) / pieces;
  return p;
}

template <class scalar_t, class mask_t, class acc_t>
__global__ void __launch_bounds__(kThreads) phase1_kernel(Problem pr, int pieces, acc_t* partial) {
  const LossParams& p = pr.params;
  const int k = num_sum_cols(p);
  const bool need_delta = p.loss != Loss::kGrpo;
  const bool seq_tis = is_sequence_tis(p.tis);
  const bool token_tis_col = k == 3 && !seq_tis;
  const auto* lp = static_cast<const scalar_t*>(pr.logp);
  const auto* old = static_cast<const scalar_t*>(pr.old_logp);
  const auto* ro = static_cast<const scalar_t*>(pr.rollout_logp);
  const auto* mask = static_cast<const mask_t*>(pr.mask);
  const Piece piece = piece_of_block(pr.cu_seqlens, pieces);
  acc_t s[3] = {acc_t(0), acc_t(0), acc_t(0)};
  for (int64_t t = piece.lo + threadIdx.x; t < piece.hi; t += kThreads) {
    const acc_t m = to_acc(mask[t]);
    if (m == acc_t(0)) continue;
    s[kSumMask] += m;
    if (need_delta) s[kSumDelta] += m * (acc_t(to_acc(lp[t])) - acc_t(to_acc(old[t])));
    if (seq_tis) {
      s[kSumTis] += m * (acc_t(to_acc(old[t])) - acc_t(to_acc(ro[t])));
    } else if (token_tis_col) {
      s[kSumTis] += m * token_tis_weight<acc_t>(p, to_acc(old[t]), to_acc(ro[t]));
    }
  }
  block_sum<acc_t, 3>(s);
  if (threadIdx.x == 0) {
    for (int j = 0; j < k; ++j) partial[blockIdx.x * int64_t(k) + j] = s[j];
  }
}

// out[i, j] = Σ_c partial[i, c, j] in piece order (deterministic), for j < cols, except column max_col (if ≥ 0):
// the max over the pieces (of values ≥ 0); out has out_cols columns.
template <class acc_t>
__global__ void combine_pieces_kernel(const acc_t* partial, int64_t num_seqs, int pieces, int cols, int out_cols,
                                      int max_col, acc_t* out) {
  const int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (idx >= num_seqs * cols) return;
  const int64_t i = idx / cols;
  const int j = int(idx % cols);
  acc_t v = acc_t(0);
  if (j == max_col) {
    for (int c = 0; c < pieces; ++c) {
      const acc_t x = partial[(i * pieces + c) * cols + j];
      v = x > v ? x : v;
    }
  } else {
    for (int c = 0; c < pieces; ++c) v += partial[(i * pieces + c) * cols + j];
  }
  out[i * out_cols + j] = v;
}

// Σ_i n_i and max_i n_i (token-mean N and L_max when the caller did not fix them), one block.
template <class acc_t>
__global__ void __launch_bounds__(kThreads) globals_kernel(const acc_t* sums, int64_t num_seqs, int k,
                                                           acc_t* globals) {
  acc_t v[1] = {acc_t(0)};
  acc_t longest = acc_t(0);
  for (int64_t i = threadIdx.x; i < num_seqs; i += kThreads) {
    const acc_t n = sums[i * k + kSumMask];
    v[0] += n;
    longest = n > longest ? n : longest;
  }
  __shared__ acc_t longest_per_thread[kThreads];
  longest_per_thread[threadIdx.x] = longest;
  block_sum<acc_t, 1>(v);  // contains a __syncthreads()
  if (threadIdx.x == 0) {
    for (int j = 1; j < kThreads; ++j) longest = longest_per_thread[j] > longest ? longest_per_thread[j] : longest;
    globals[0] = v[0];
    globals[1] = longest;
  }
}

template <class scalar_t, class mask_t, class acc_t>
__global__ void __launch_bounds__(kThreads)
    phase2_kernel(Problem pr, int pieces, const acc_t* sums, const acc_t* globals, const acc_t* grad_scale,
                  acc_t* partial, acc_t* table, scalar_t* grad) {
  const LossParams& p = pr.params;
  const int k = num_sum_cols(p);
  const auto* lp = static_cast<const scalar_t*>(pr.logp);
  const auto* old = static_cast<const scalar_t*>(pr.old_logp);
  const auto* ro = static_cast<const scalar_t*>(pr.rollout_logp);
  const auto* ref = static_cast<const scalar_t*>(pr.ref_logp);
  const auto* mask = static_cast<const mask_t*>(pr.mask);
  const auto* adv = static_cast<const acc_t*>(pr.advantages);
  const bool token_tis = p.tis == Tis::kToken;
  const bool kl = p.kl != Kl::kNone;
  const Piece piece = piece_of_block(pr.cu_seqlens, pieces);
  const acc_t scale = grad_scale ? *grad_scale : acc_t(1);
  const Globals<acc_t> g = make_globals<acc_t>(p, globals[0], globals[1]);
  acc_t row[3];
  for (int j = 0; j < k; ++j) row[j] = sums[piece.seq * k + j];
  const SeqCoef<acc_t> c =
      sequence_coefficients<acc_t>(p, row, k, p.per_token_adv ? acc_t(0) : adv[piece.seq], g);
  acc_t acc[kNumTokenCols];
#pragma unroll
  for (int j = 0; j < kNumTokenCols; ++j) acc[j] = acc_t(0);
  for (int64_t t = piece.lo + threadIdx.x; t < piece.hi; t += kThreads) {
    const acc_t m = to_acc(mask[t]);
    if (m == acc_t(0)) {
      if (grad) store(grad + t, 0.0f);
      continue;
    }
    const TokenTerms<acc_t> tt =
        token_step<acc_t>(p, c, m, to_acc(lp[t]), to_acc(old[t]), token_tis ? acc_t(to_acc(ro[t])) : acc_t(0),
                          kl ? acc_t(to_acc(ref[t])) : acc_t(0), p.per_token_adv ? adv[t] : acc_t(0));
    add_token_terms<acc_t>(acc, tt);
    if (grad) store(grad + t, tt.grad * scale);
  }
  static_assert(kTisRatioMax == kNumTokenCols - 1, "the token max is the last token column");
  block_sum<acc_t, kNumTokenCols, true>(acc);
  if (threadIdx.x == 0) {
    for (int j = 0; j < kNumTokenCols; ++j) partial[blockIdx.x * int64_t(kNumTokenCols) + j] = acc[j];
    if (piece.index == 0) sequence_table_cols<acc_t>(p, c, table + piece.seq * kNumTableCols);
  }
}

// Gradient 0 outside every sequence: [0, cu[0]) and [cu[B], T) (trailing padding).
template <class scalar_t>
__global__ void zero_padding_kernel(const int64_t* cu, int64_t num_seqs, int64_t num_tokens, scalar_t* grad) {
  const int64_t head = cu[0], tail_begin = cu[num_seqs];
  const int64_t count = head + (num_tokens - tail_begin);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < count; j += stride) {
    store(grad + (j < head ? j : tail_begin + (j - head)), 0.0f);
  }
}

int sm_count(int device) {
  int count = 0;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || count < 1) count = 1;
  return count;
}

// Pieces per sequence: enough blocks for kBlocksPerSm per SM, but pieces of ≥ kMinPieceTokens on average.
int num_pieces(const Problem& pr, int device) {
  const int64_t B = pr.num_seqs > 0 ? pr.num_seqs : 1;
  const int64_t wanted = (int64_t(kBlocksPerSm) * sm_count(device) + B - 1) / B;
  int64_t longest_useful = pr.num_tokens / B / kMinPieceTokens;
  if (longest_useful < 1) longest_useful = 1;
  int64_t s = wanted < longest_useful ? wanted : longest_useful;
  if (s < 1) s = 1;
  if (s > 1024) s = 1024;
  return int(s);
}

size_t acc_size(const Problem& pr) { return pr.token_dtype == DType::kFloat64 ? sizeof(double) : sizeof(float); }

size_t align_up(size_t bytes) { return (bytes + 255) / 256 * 256; }

template <class scalar_t, class mask_t, class acc_t>
cudaError_t launch_phase1(const Problem& pr, acc_t* sums, void* workspace, cudaStream_t stream, int device) {
  const int pieces = num_pieces(pr, device);
  const int k = num_sum_cols(pr.params);
  auto* partial = static_cast<acc_t*>(workspace);
  const int64_t blocks = pr.num_seqs * pieces;
  phase1_kernel<scalar_t, mask_t, acc_t><<<unsigned(blocks), kThreads, 0, stream>>>(pr, pieces, partial);
  const int64_t combine = pr.num_seqs * k;
  combine_pieces_kernel<acc_t><<<unsigned((combine + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      partial, pr.num_seqs, pieces, k, k, -1, sums);
  return cudaGetLastError();
}

template <class scalar_t, class mask_t, class acc_t>
cudaError_t launch_phase2(const Problem& pr, const acc_t* sums, acc_t* table, scalar_t* grad, const acc_t* grad_scale,
                          void* workspace, cudaStream_t stream, int device) {
  const int pieces = num_pieces(pr, device);
  const int k = num_sum_cols(pr.params);
  auto* globals = static_cast<acc_t*>(workspace);
  auto* partial = reinterpret_cast<acc_t*>(static_cast<char*>(workspace) + align_up(2 * sizeof(acc_t)));
  globals_kernel<acc_t><<<1, kThreads, 0, stream>>>(sums, pr.num_seqs, k, globals);
  const int64_t blocks = pr.num_seqs * pieces;
  phase2_kernel<scalar_t, mask_t, acc_t>
      <<<unsigned(blocks), kThreads, 0, stream>>>(pr, pieces, sums, globals, grad_scale, partial, table, grad);
  const int64_t combine = pr.num_seqs * kNumTokenCols;
  combine_pieces_kernel<acc_t><<<unsigned((combine + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      partial, pr.num_seqs, pieces, kNumTokenCols, kNumTableCols, kTisRatioMax, table);
  if (grad) {
    const int64_t want = (pr.num_tokens + kThreads - 1) / kThreads;
    const int64_t cap = int64_t(2) * sm_count(device);
    const unsigned blocks_zero = unsigned(want < cap ? (want > 0 ? want : 1) : cap);
    zero_padding_kernel<scalar_t><<<blocks_zero, kThreads, 0, stream>>>(pr.cu_seqlens, pr.num_seqs, pr.num_tokens,
                                                                        grad);
  }
  return cudaGetLastError();
}

template <template <class, class, class> class Launch, class... Args>
cudaError_t dispatch(const Problem& pr, Args... args) {
  const bool byte_mask = pr.mask_dtype == DType::kUInt8;
  switch (pr.token_dtype) {
    case DType::kFloat64:
      return byte_mask ? Launch<double, uint8_t, double>::run(pr, args...)
                       : Launch<double, double, double>::run(pr, args...);
    case DType::kFloat32:
      return byte_mask ? Launch<float, uint8_t, float>::run(pr, args...) : Launch<float, float, float>::run(pr, args...);
    case DType::kBFloat16:
      return byte_mask ? Launch<__nv_bfloat16, uint8_t, float>::run(pr, args...)
                       : Launch<__nv_bfloat16, __nv_bfloat16, float>::run(pr, args...);
    case DType::kFloat16:
      return byte_mask ? Launch<__half, uint8_t, float>::run(pr, args...) : Launch<__half, __half, float>::run(pr, args...);
    default:
      return cudaErrorInvalidValue;
  }
}

template <class scalar_t, class mask_t, class acc_t>
struct Phase1 {
  static cudaError_t run(const Problem& pr, void* sums, void* workspace, cudaStream_t stream, int device) {
    return launch_phase1<scalar_t, mask_t, acc_t>(pr, static_cast<acc_t*>(sums), workspace, stream, device);
  }
};

template <class scalar_t, class mask_t, class acc_t>
struct Phase2 {
  static cudaError_t run(const Problem& pr, const void* sums, void* table, void* grad, const void* grad_scale,
                         void* workspace, cudaStream_t stream, int device) {
    return launch_phase2<scalar_t, mask_t, acc_t>(pr, static_cast<const acc_t*>(sums), static_cast<acc_t*>(table),
                                                  static_cast<scalar_t*>(grad), static_cast<const acc_t*>(grad_scale),
                                                  workspace, stream, device);
  }
};

const char* error_string(cudaError_t err) { return err == cudaSuccess ? nullptr : cudaGetErrorString(err); }

}  // namespace

int64_t phase1_cuda_workspace_bytes(const Problem& prob, int device) {
  const int64_t pieces = num_pieces(prob, device);
  return int64_t(align_up(size_t(prob.num_seqs * pieces * num_sum_cols(prob.params)) * acc_size(prob)));
}

int64_t phase2_cuda_workspace_bytes(const Problem& prob, int device) {
  const int64_t pieces = num_pieces(prob, device);
  return int64_t(align_up(2 * acc_size(prob)) + align_up(size_t(prob.num_seqs * pieces * kNumTokenCols) * acc_size(prob)));
}

const char* phase1_cuda(const Problem& prob, void* sums, void* workspace, void* stream, int device) {
  if (prob.num_seqs == 0) return nullptr;
  return error_string(dispatch<Phase1>(prob, sums, workspace, static_cast<cudaStream_t>(stream), device));
}

const char* phase2_cuda(const Problem& prob, const void* sums, void* table, void* grad, const void* grad_scale,
                        void* workspace, void* stream, int device) {
  if (prob.num_seqs == 0) {
    if (grad && prob.num_tokens > 0) {
      return error_string(cudaMemsetAsync(grad, 0, size_t(prob.num_tokens) *
                                                       (prob.token_dtype == DType::kFloat64   ? 8
                                                        : prob.token_dtype == DType::kFloat32 ? 4
                                                                                              : 2),
                                          static_cast<cudaStream_t>(stream)));
    }
    return nullptr;
  }
  return error_string(
      dispatch<Phase2>(prob, sums, table, grad, grad_scale, workspace, static_cast<cudaStream_t>(stream), device));
}

}  // namespace luspo
