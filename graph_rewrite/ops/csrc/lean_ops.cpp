// C++ Autograd kernels for graph_rewrite::softplus, ::sigmoid and ::logsigmoid on plain CPU tensors.
//
// The same ops as graph_rewrite/ops/activations.py, without the Python round trips: the dispatcher
// calling a Python kernel, autograd.Function.apply and a Python backward make a 1k-element softplus
// forward and backward cost 2.7x to 3.8x native's time on CPU, by host (benchmarks/OVERHEAD.md). These kernels
// compute the same bits (same ATen calls, same order).
// Anything else (tracers, subclasses, torch.func, autocast, CUDA, branch masks, second derivatives,
// tiny outputs in backward) goes to the Python kernels, through the twin ops "_<name>_python" and
// "_<name>_grad_python" that activations.py defines.
//
// recompute_ops.cpp has those of norm_act and the recompute consumers; common.h what both share.
//
// Loaded by graph_rewrite/ops/cpp.py with ctypes: it checks graph_rewrite_built_for() against the
// running torch before graph_rewrite_register() adds the kernels, so a build for another torch is
// never used.
#include "common.h"

#include <cmath>
#include <limits>
#include <optional>

#ifndef GR_TORCH_VERSION
#define GR_TORCH_VERSION "unknown"
#endif

namespace graph_rewrite {

thread_local int python_only_depth = 0;

double eps(at::ScalarType s) {
  switch (s) {
    case at::kDouble: return std::numeric_limits<double>::epsilon();
    case at::kHalf: return 0.0009765625;     // 2^-10
    case at::kBFloat16: return 0.0078125;    // 2^-7
    default: return std::numeric_limits<float>::epsilon();
  }
}

double tiny(at::ScalarType s) {  // the smallest normal
  switch (s) {
    case at::kDouble: return std::numeric_limits<double>::min();
    case at::kHalf: return 6.103515625e-05;  // 2^-14
    case at::kBFloat16: return std::numeric_limits<float>::min();
    default: return std::numeric_limits<float>::min();
  }
}

// activations.softplus_needs_branch_mask
bool needs_branch_mask(at::ScalarType s, double threshold) {
  return !std::isnan(threshold) && std::exp(-threshold) >= eps(s) / 16;
}

// activations.underflow_record (eager, CPU): the inputs of subnormal or zero outputs, or undefined.
at::Tensor underflow_record(const at::Tensor& x, const at::Tensor& y, int sign) {
  if (y.numel() == 0) return {};
  const double t = tiny(y.scalar_type());
  bool may;
  if (sign > 0) {  // min and max, not amin and amax: the same value, a cheaper call
    may = !(y.min().item<double>() >= t);
  } else if (sign < 0) {
    may = !(y.max().item<double>() <= -t);
  } else {
    auto [lo, hi] = at::aminmax(y);
    may = !(lo.item<double>() >= t || hi.item<double>() <= -t);
  }
  if (!may) return {};
  at::Tensor small = y.abs() < t;
  return small.any().item<bool>() ? x.masked_select(small) : at::Tensor();
}

at::Tensor opmath(const at::Tensor& t) {
  auto s = t.scalar_type();
  return (s == at::kHalf || s == at::kBFloat16) ? t.to(at::kFloat) : t;
}

// activations._times_grad: in place where the strides agree, else grad's strides, as native gives.
at::Tensor times_grad(at::Tensor t, const at::Tensor& grad) {
  if (t.strides() == grad.strides()) return t.mul_(grad);
  return at::mul(grad, t);
}

// ``torch.mul(t, s)`` for a Python float s, as activations.py computes it: the CPU kernel takes a
// one-element operand as a scalar in t's opmath type, so a 0-d tensor of t's dtype gives the same
// bits as the wrapped double, without the cast of it that costs more than the multiply at 1k
// elements.
at::Tensor times_scalar(const at::Tensor& t, double s) { return at::mul(t, at::scalar_tensor(s, t.options())); }

at::Tensor as_dtype(const at::Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); }

// ----------------------------------------------------------------------------------- softplus
using SoftplusSig = at::Tensor(const at::Tensor&, double, double);
using SoftplusGradSig = at::Tensor(const at::Tensor&, const at::Tensor&, double, double,
                                   const std::optional<at::Tensor>&);

struct LeanSoftplus : public torch::autograd::Function<LeanSoftplus> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, double beta, double threshold) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor y = at::softplus(x, beta, threshold);
    // threshold >= 0: both branches give outputs of beta's sign.
    const int sign = threshold >= 0 ? (beta > 0 ? 1 : -1) : 0;
    ctx->save_for_backward({y, underflow_record(x, y, sign)});
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["threshold"] = threshold;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad = grads[0];
    auto saved = ctx->get_saved_variables();
    const at::Tensor &y = saved[0], &record = saved[1];
    const double beta = ctx->saved_data["beta"].toDouble();
    if (at::GradMode::is_enabled() || record.defined()) {  // second derivatives, tiny outputs: Python
      static auto grad_python = twin<SoftplusGradSig>("graph_rewrite::_softplus_grad_python");
      return {grad_python.call(grad, y, beta, ctx->saved_data["threshold"].toDouble(),
                               record.defined() ? std::optional<at::Tensor>(record) : std::nullopt),
              {}, {}};
    }
    // activations._softplus_grad_plain: -(expm1(-beta*y) * grad), in opmath.
    at::Tensor t = times_scalar(opmath(y), -beta);
    t.expm1_();
    t = times_grad(t, grad);
    t.neg_();
    return {as_dtype(t, grad.scalar_type()), {}, {}};
  }
};

at::Tensor softplus(const at::Tensor& x, double beta, double threshold) {
  const bool lean = beta != 0 && std::isfinite(beta);  // activations.softplus_beta_is_lean
  if (!plain_cpu(x) || !floating(x) || !lean || needs_branch_mask(x.scalar_type(), threshold)) {
    static auto python = twin<SoftplusSig>("graph_rewrite::_softplus_python");
    return python.call(x, beta, threshold);
  }
  if (at::GradMode::is_enabled() && x.requires_grad()) return LeanSoftplus::apply(x, beta, threshold);
  at::AutoDispatchBelowADInplaceOrView guard;
  return at::softplus(x, beta, threshold);
}

// ----------------------------------------------------------------------------------- sigmoid
struct LeanSigmoid : public torch::autograd::Function<LeanSigmoid> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor y = at::sigmoid(x);
    ctx->save_for_backward({y});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // The kernel native autograd uses; differentiable, so create_graph needs nothing more.
    return {at::sigmoid_backward(grads[0], ctx->get_saved_variables()[0])};
  }
};

at::Tensor sigmoid(const at::Tensor& x) {
  if (!plain_cpu(x) || !floating(x)) {
    static auto python = twin<at::Tensor(const at::Tensor&)>("graph_rewrite::_sigmoid_python");
    return python.call(x);
  }
  if (at::GradMode::is_enabled() && x.requires_grad()) return LeanSigmoid::apply(x);
  at::AutoDispatchBelowADInplaceOrView guard;
  return at::sigmoid(x);
}

// ----------------------------------------------------------------------------------- logsigmoid
using LogSigmoidGradSig = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&);

struct LeanLogSigmoid : public torch::autograd::Function<LeanLogSigmoid> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor y = at::log_sigmoid(x).contiguous();
    ctx->save_for_backward({y, underflow_record(x, y, /*sign=*/-1)});  // logsigmoid <= 0
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad = grads[0];
    auto saved = ctx->get_saved_variables();
    const at::Tensor &y = saved[0], &record = saved[1];
    if (at::GradMode::is_enabled() || record.defined()) {
      static auto grad_python = twin<LogSigmoidGradSig>("graph_rewrite::_logsigmoid_grad_python");
      return {grad_python.call(grad, y, record.defined() ? std::optional<at::Tensor>(record) : std::nullopt)};
    }
    // activations._logsigmoid_grad_plain: -(expm1(y) * grad), in opmath.
    at::Tensor t = times_grad(at::expm1(opmath(y)), grad);
    t.neg_();
    return {as_dtype(t, grad.scalar_type())};
  }
};

at::Tensor logsigmoid(const at::Tensor& x) {
  if (!plain_cpu(x) || !floating(x)) {
    static auto python = twin<at::Tensor(const at::Tensor&)>("graph_rewrite::_logsigmoid_python");
    return python.call(x);
  }
  if (at::GradMode::is_enabled() && x.requires_grad()) return LeanLogSigmoid::apply(x);
  at::AutoDispatchBelowADInplaceOrView guard;
  return at::log_sigmoid(x).contiguous();
}

}  // namespace graph_rewrite

extern "C" {

// The torch version this file was compiled against (torch.__version__).
const char* graph_rewrite_built_for() { return GR_TORCH_VERSION; }

// delta = +1 on entering a region whose calls take the Python kernels, -1 on leaving it; this thread only.
void graph_rewrite_python_only(int delta) { graph_rewrite::python_only_depth += delta; }

// Make these and recompute_ops.cpp's the Autograd kernels of the ops activations.py and recompute.py
// defined. Once per process.
void graph_rewrite_register() {
  static torch::Library* lib = nullptr;
  if (lib != nullptr) return;
  lib = new torch::Library(torch::Library::IMPL, "graph_rewrite", c10::DispatchKey::Autograd, __FILE__, __LINE__);
  lib->impl("softplus", TORCH_FN(graph_rewrite::softplus));
  lib->impl("sigmoid", TORCH_FN(graph_rewrite::sigmoid));
  lib->impl("logsigmoid", TORCH_FN(graph_rewrite::logsigmoid));
  graph_rewrite::register_recompute(*lib);
}

}  // extern "C"
