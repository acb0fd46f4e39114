// Torch bindings of the fused sequence log-ratio + policy loss: two custom ops in the `luspo` namespace,
// registered with TORCH_LIBRARY so that the dispatcher, torch.compile (with the fake kernels registered in
// luspo_megatron/ops/_extension.py) and autograd (the torch.autograd.Function in
// luspo_megatron/ops/fused_policy_loss.py) all see them as ordinary operators.
//
//   luspo::seq_logratio_phase1   tokens → per-sequence partial sums [B, k]
//   luspo::seq_policy_loss_phase2  tokens + global sums → per-sequence table [B, 17] and ∂L/∂logp [T]
//
// The CUDA implementation is registered only when this file is compiled with LUSPO_WITH_CUDA (setup.py does
// that where nvcc and a CUDA build of torch exist); the kernels themselves are torch-free.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "seq_logratio.h"

#ifdef LUSPO_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace {

using luspo::DType;

std::string str(c10::string_view v) { return std::string(v.data(), v.size()); }

DType token_dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK(false, name, ": expected float32/float64/bfloat16/float16, got ", t.scalar_type());
  }
  return DType::kFloat32;
}

at::ScalarType acc_type(const at::Tensor& logp) {
  return logp.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

luspo::Loss parse_loss(c10::string_view v) {
  const std::string s = str(v);
  if (s == "grpo") return luspo::Loss::kGrpo;
  if (s == "gspo") return luspo::Loss::kGspo;
  if (s == "gspo_token") return luspo::Loss::kGspoToken;
  if (s == "luspo") return luspo::Loss::kLuspo;
  TORCH_CHECK(false, "loss: expected grpo/gspo/gspo_token/luspo, got ", s);
  return luspo::Loss::kLuspo;
}

luspo::Agg parse_agg(c10::string_view v) {
  const std::string s = str(v);
  if (s == "token-mean") return luspo::Agg::kTokenMean;
  if (s == "seq-mean-token-mean") return luspo::Agg::kSeqMeanTokenMean;
  if (s == "seq-mean-token-sum") return luspo::Agg::kSeqMeanTokenSum;
  if (s == "seq-mean-token-sum-norm") return luspo::Agg::kSeqMeanTokenSumNorm;
  TORCH_CHECK(false, "agg: expected an aggregation mode, got ", s);
  return luspo::Agg::kTokenMean;
}

luspo::Tis parse_tis(c10::string_view v) {
  const std::string s = str(v);
  if (s == "none") return luspo::Tis::kNone;
  if (s == "token") return luspo::Tis::kToken;
  if (s == "sequence") return luspo::Tis::kSequence;
  if (s == "geometric") return luspo::Tis::kGeometric;
  TORCH_CHECK(false, "tis_level: expected none/token/sequence/geometric, got ", s);
  return luspo::Tis::kNone;
}

luspo::TisMode parse_tis_mode(c10::string_view v) {
  const std::string s = str(v);
  if (s == "truncate") return luspo::TisMode::kTruncate;
  if (s == "mask") return luspo::TisMode::kMask;
  TORCH_CHECK(false, "tis_mode: expected truncate/mask, got ", s);
  return luspo::TisMode::kTruncate;
}

// The TIS parameters of both ops, checked once.
void set_tis(luspo::LossParams& params, c10::string_view tis_level, c10::string_view tis_mode, double tis_clip,
             double tis_lower) {
  params.tis = parse_tis(tis_level);
  params.tis_mode = parse_tis_mode(tis_mode);
  params.tis_clip = tis_clip;
  params.tis_lower = tis_lower;
  if (params.tis == luspo::Tis::kNone) return;
  TORCH_CHECK(tis_clip > 0, "tis_clip: expected > 0, got ", tis_clip);
  TORCH_CHECK(params.tis_mode != luspo::TisMode::kMask || (tis_lower > 0 && tis_lower < tis_clip),
              "tis_lower: expected 0 < tis_lower < tis_clip = ", tis_clip, " for mask mode, got ", tis_lower);
}

luspo::Kl parse_kl(c10::string_view v) {
  const std::string s = str(v);
  if (s == "none") return luspo::Kl::kNone;
  if (s == "k1") return luspo::Kl::kK1;
  if (s == "k2") return luspo::Kl::kK2;
  if (s == "k3") return luspo::Kl::kK3;
  TORCH_CHECK(false, "kl_type: expected none/k1/k2/k3, got ", s);
  return luspo::Kl::kNone;
}

// Contiguous views of the inputs (kept alive here) and the raw-pointer problem built from them.
struct Inputs {
  at::Tensor logp, old_logp, rollout_logp, ref_logp, mask, cu, advantages;
  luspo::Problem prob;
};

at::Tensor same_token_array(const at::Tensor& t, const at::Tensor& logp, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.numel() == logp.numel(), name, ": expected [", logp.numel(), "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == logp.scalar_type(), name, ": expected dtype ", logp.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == logp.device(), name, ": expected device ", logp.device(), ", got ", t.device());
  return t.contiguous();
}

Inputs prepare(const at::Tensor& logp, const at::Tensor& old_logp, const std::optional<at::Tensor>& rollout_logp,
               const std::optional<at::Tensor>& ref_logp, const at::Tensor& loss_mask, const at::Tensor& cu_seqlens,
               const luspo::LossParams& params) {
  Inputs in;
  TORCH_CHECK(logp.dim() == 1, "logp: expected a 1-D packed tensor [T], got ", logp.sizes());
  in.prob.token_dtype = token_dtype_of(logp, "logp");
  in.logp = logp.contiguous();
  in.old_logp = same_token_array(old_logp, logp, "old_logp");
  if (params.tis != luspo::Tis::kNone) {
    TORCH_CHECK(rollout_logp.has_value(), "rollout_logp: required when TIS is on");
    in.rollout_logp = same_token_array(*rollout_logp, logp, "rollout_logp");
  }
  if (params.kl != luspo::Kl::kNone) {
    TORCH_CHECK(ref_logp.has_value(), "ref_logp: required when kl_type is not none");
    in.ref_logp = same_token_array(*ref_logp, logp, "ref_logp");
  }
  TORCH_CHECK(loss_mask.dim() == 1 && loss_mask.numel() == logp.numel(), "loss_mask: expected [", logp.numel(),
              "], got ", loss_mask.sizes());
  TORCH_CHECK(loss_mask.device() == logp.device(), "loss_mask: expected device ", logp.device());
  if (loss_mask.scalar_type() == at::kBool || loss_mask.scalar_type() == at::kByte) {
    in.mask = loss_mask.contiguous().view(at::kByte);
    in.prob.mask_dtype = DType::kUInt8;
  } else {
    TORCH_CHECK(loss_mask.scalar_type() == logp.scalar_type(), "loss_mask: expected bool/uint8 or ",
                logp.scalar_type(), ", got ", loss_mask.scalar_type());
    in.mask = loss_mask.contiguous();
    in.prob.mask_dtype = in.prob.token_dtype;
  }
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1, "cu_seqlens: expected [B+1], got ",
              cu_seqlens.sizes());
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt || cu_seqlens.scalar_type() == at::kLong,
              "cu_seqlens: expected int32/int64, got ", cu_seqlens.scalar_type());
  TORCH_CHECK(cu_seqlens.device() == logp.device(), "cu_seqlens: expected device ", logp.device());
  in.cu = cu_seqlens.to(at::kLong).contiguous();
  const int64_t B = cu_seqlens.numel() - 1, T = logp.numel();
  if (!logp.is_cuda()) {  // a device-side check would need a host sync; the CPU check is B+1 reads
    const int64_t* cu = in.cu.data_ptr<int64_t>();
    TORCH_CHECK(cu[0] == 0 && cu[B] <= T, "cu_seqlens: expected cu[0] = 0 and cu[-1] ≤ T = ", T);
    for (int64_t i = 0; i < B; ++i) TORCH_CHECK(cu[i] <= cu[i + 1], "cu_seqlens: expected non-decreasing");
  }
  in.prob.num_tokens = T;
  in.prob.num_seqs = B;
  in.prob.params = params;
  in.prob.cu_seqlens = in.cu.data_ptr<int64_t>();
  in.prob.logp = in.logp.data_ptr();
  in.prob.old_logp = in.old_logp.data_ptr();
  in.prob.rollout_logp = in.rollout_logp.defined() ? in.rollout_logp.data_ptr() : nullptr;
  in.prob.ref_logp = in.ref_logp.defined() ? in.ref_logp.data_ptr() : nullptr;
  in.prob.mask = in.mask.data_ptr();
  return in;
}

at::Tensor seq_logratio_phase1(const at::Tensor& logp, const at::Tensor& old_logp,
                               const std::optional<at::Tensor>& rollout_logp, const at::Tensor& loss_mask,
                               const at::Tensor& cu_seqlens, c10::string_view loss, c10::string_view tis_level,
                               c10::string_view tis_mode, double tis_clip, double tis_lower) {
  luspo::LossParams params;
  params.loss = parse_loss(loss);
  set_tis(params, tis_level, tis_mode, tis_clip, tis_lower);
  Inputs in = prepare(logp, old_logp, rollout_logp, std::nullopt, loss_mask, cu_seqlens, params);
  const int k = luspo::num_sum_cols(params);
  at::Tensor sums = at::empty({in.prob.num_seqs, k}, logp.options().dtype(acc_type(logp)));
  if (in.prob.num_seqs == 0) return sums;
#ifdef LUSPO_WITH_CUDA
  if (logp.is_cuda()) {
    const c10::cuda::CUDAGuard guard(logp.device());
    const int device = logp.get_device();
    at::Tensor ws = at::empty({luspo::phase1_cuda_workspace_bytes(in.prob, device)}, logp.options().dtype(at::kByte));
    const char* err =
        luspo::phase1_cuda(in.prob, sums.data_ptr(), ws.data_ptr(), c10::cuda::getCurrentCUDAStream().stream(), device);
    TORCH_CHECK(err == nullptr, "luspo::seq_logratio_phase1: CUDA error: ", err);
    return sums;
  }
#endif
  TORCH_CHECK(logp.device().is_cpu(), "luspo::seq_logratio_phase1: this build has no kernel for ", logp.device());
  luspo::phase1_cpu(in.prob, sums.data_ptr());
  return sums;
}

std::tuple<at::Tensor, at::Tensor> seq_policy_loss_phase2(
    const at::Tensor& logp, const at::Tensor& old_logp, const std::optional<at::Tensor>& rollout_logp,
    const std::optional<at::Tensor>& ref_logp, const at::Tensor& loss_mask, const at::Tensor& cu_seqlens,
    const at::Tensor& advantages, const at::Tensor& sums, c10::string_view loss, c10::string_view agg,
    c10::string_view tis_level, c10::string_view tis_mode, c10::string_view kl_type, double eps_lo, double eps_hi,
    double tis_clip, double tis_lower, double kl_coef, double num_sequences, double num_tokens, double max_len,
    bool write_grad, const std::optional<at::Tensor>& grad_scale) {
  luspo::LossParams params;
  params.loss = parse_loss(loss);
  params.agg = parse_agg(agg);
  set_tis(params, tis_level, tis_mode, tis_clip, tis_lower);
  params.kl = parse_kl(kl_type);
  params.eps_lo = eps_lo;
  params.eps_hi = eps_hi;
  params.kl_coef = kl_coef;
  params.num_sequences = num_sequences;
  params.num_tokens = num_tokens;
  params.max_len = max_len;
  Inputs in = prepare(logp, old_logp, rollout_logp, ref_logp, loss_mask, cu_seqlens, params);
  const int64_t B = in.prob.num_seqs, T = in.prob.num_tokens;
  const at::ScalarType acc = acc_type(logp);
  TORCH_CHECK(num_sequences >= 1, "num_sequences: expected the global sequence count ≥ 1, got ", num_sequences);
  TORCH_CHECK(advantages.dim() == 1 && (advantages.numel() == B || advantages.numel() == T),
              "advantages: expected [", B, "] or [", T, "], got ", advantages.sizes());
  TORCH_CHECK(advantages.scalar_type() == acc, "advantages: expected dtype ", acc, ", got ", advantages.scalar_type());
  TORCH_CHECK(advantages.device() == logp.device(), "advantages: expected device ", logp.device());
  in.prob.params.per_token_adv = advantages.numel() != B;
  TORCH_CHECK(!(in.prob.params.per_token_adv && luspo::is_sequence_level(params.loss)),
              "advantages: expected [", B, "] per sequence for ", str(loss));
  in.advantages = advantages.contiguous();
  in.prob.advantages = in.advantages.data_ptr();
  const int k = luspo::num_sum_cols(params);
  TORCH_CHECK(sums.dim() == 2 && sums.size(0) == B && sums.size(1) == k, "sums: expected [", B, ", ", k, "], got ",
              sums.sizes());
  TORCH_CHECK(sums.scalar_type() == acc && sums.device() == logp.device(), "sums: expected ", acc, " on ",
              logp.device());
  const at::Tensor sums_c = sums.contiguous();
  at::Tensor scale;
  if (grad_scale.has_value()) {
    TORCH_CHECK(grad_scale->numel() == 1 && grad_scale->device() == logp.device(),
                "grad_scale: expected one value on ", logp.device());
    scale = grad_scale->to(acc).contiguous();
  }
  at::Tensor table = at::empty({B, luspo::kNumTableCols}, logp.options().dtype(acc));
  at::Tensor grad = at::empty({write_grad ? T : 0}, logp.options());
  void* grad_ptr = write_grad ? grad.data_ptr() : nullptr;
  const void* scale_ptr = scale.defined() ? scale.data_ptr() : nullptr;
#ifdef LUSPO_WITH_CUDA
  if (logp.is_cuda()) {
    const c10::cuda::CUDAGuard guard(logp.device());
    const int device = logp.get_device();
    at::Tensor ws = at::empty({luspo::phase2_cuda_workspace_bytes(in.prob, device)}, logp.options().dtype(at::kByte));
    const char* err = luspo::phase2_cuda(in.prob, sums_c.data_ptr(), table.data_ptr(), grad_ptr, scale_ptr,
                                         ws.data_ptr(), c10::cuda::getCurrentCUDAStream().stream(), device);
    TORCH_CHECK(err == nullptr, "luspo::seq_policy_loss_phase2: CUDA error: ", err);
    return {table, grad};
  }
#endif
  TORCH_CHECK(logp.device().is_cpu(), "luspo::seq_policy_loss_phase2: this build has no kernel for ", logp.device());
  luspo::phase2_cpu(in.prob, sums_c.data_ptr(), table.data_ptr(), grad_ptr, scale_ptr);
  return {table, grad};
}

}  // namespace

TORCH_LIBRARY(luspo, m) {
  m.def(
      "seq_logratio_phase1(Tensor logp, Tensor old_logp, Tensor? rollout_logp, Tensor loss_mask, "
      "Tensor cu_seqlens, str loss, str tis_level, str tis_mode, float tis_clip, float tis_lower) -> Tensor");
  m.def(
      "seq_policy_loss_phase2(Tensor logp, Tensor old_logp, Tensor? rollout_logp, Tensor? ref_logp, "
      "Tensor loss_mask, Tensor cu_seqlens, Tensor advantages, Tensor sums, str loss, str agg, str tis_level, "
      "str tis_mode, str kl_type, float eps_lo, float eps_hi, float tis_clip, float tis_lower, float kl_coef, "
      "float num_sequences, float num_tokens, float max_len, bool write_grad, Tensor? grad_scale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(luspo, CPU, m) {
  m.impl("seq_logratio_phase1", &seq_logratio_phase1);
  m.impl("seq_policy_loss_phase2", &seq_policy_loss_phase2);
}

#ifdef LUSPO_WITH_CUDA
TORCH_LIBRARY_IMPL(luspo, CUDA, m) {
  m.impl("seq_logratio_phase1", &seq_logratio_phase1);
  m.impl("seq_policy_loss_phase2", &seq_policy_loss_phase2);
}
#endif

// `import luspo_megatron._C` runs the registrations above. The module itself only says which CPU build runs.
namespace {
PyObject* py_cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(luspo::cpu_isa()); }
PyMethodDef methods[] = {
    {"cpu_isa", py_cpu_isa, METH_NOARGS, "Which build of the CPU kernels runs: 'avx2' or 'base'."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "luspo custom ops (see csrc/)", -1, methods};
  return PyModule_Create(&module);
}
