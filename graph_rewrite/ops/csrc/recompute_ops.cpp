// C++ Autograd kernels for graph_rewrite::norm_act, ::recompute_conv, ::recompute_mul and
// ::recompute_linear on plain CPU tensors: graph_rewrite/ops/recompute.py's autograd.Functions
// without the Python round trips, which cost efficientnet_b0 (33 norm_act and 64 recompute calls)
// about a fifth of its training step at 64 px on CPU. The same ATen calls in the same order, so
// the same bits as the Python kernels.
//
// A consumer after a norm_act (BatchNorm -> SiLU -> convolution) keeps the norm_act's tensors, not
// its output, and asks it for the BatchNorm's output in backward: the two share one NormState,
// which caches that output between the consumer's backward and the norm_act's, as recompute.py's
// norm_output does.
//
// The Python kernels (the twins "_<name>_python") take what these do not serve: tracers,
// subclasses, transforms, autocast, CUDA, GroupNorm, LayerNorm recomputes, activations with
// no entry below, and consumers of a Python lean producer (recompute_module, or a norm_act that
// went to Python).
#include "common.h"

#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/generated/Functions.h>

#include <atomic>
#include <cstring>
#include <optional>
#include <typeinfo>

namespace graph_rewrite {

using OptTensor = std::optional<at::Tensor>;
using torch::autograd::CppNode;
// An autograd node's owning pointer (a shared_ptr in older torch releases).
using NodePtr = std::decay_t<decltype(std::declval<const at::Tensor&>().grad_fn())>;

// ----------------------------------------------------------------------------------- activations
// recompute.ACTIVATIONS and ACTIVATION_BACKWARDS, as numbers; anything else is Python's.
enum Act : int64_t { kGelu, kGeluTanh, kSilu, kHardswish, kMish, kElu, kCelu, kSelu, kUnknown };

Act act_of(c10::string_view name) {
  static const std::pair<const char*, Act> names[] = {
      {"gelu", kGelu}, {"gelu_tanh", kGeluTanh}, {"silu", kSilu}, {"hardswish", kHardswish},
      {"mish", kMish}, {"elu", kElu}, {"celu", kCelu}, {"selu", kSelu}};
  for (const auto& [n, a] : names) {
    if (name == n) return a;
  }
  return kUnknown;  // "identity" (it reads a Python producer) and "layer_norm" included
}

at::Tensor act_forward(int64_t act, const at::Tensor& x, double arg) {
  switch (act) {
    case kGelu: return at::gelu(x);
    case kGeluTanh: return at::gelu(x, "tanh");
    case kSilu: return at::silu(x);
    case kHardswish: return at::hardswish(x);
    case kMish: return at::mish(x);
    case kElu: return at::elu(x, arg);
    case kCelu: return at::celu(x, arg);
    default: return at::selu(x);
  }
}

constexpr double kSeluAlpha = 1.6732632423543772848170429916717;
constexpr double kSeluScale = 1.0507009873554804934193349852946;

at::Tensor act_backward(int64_t act, const at::Tensor& g, const at::Tensor& x, double arg) {
  switch (act) {
    case kGelu: return at::gelu_backward(g, x);
    case kGeluTanh: return at::gelu_backward(g, x, "tanh");
    case kSilu: return at::silu_backward(g, x);
    case kHardswish: return at::hardswish_backward(g, x);
    case kMish: return at::mish_backward(g, x);
    case kElu: return at::elu_backward(g, arg, 1, 1, false, x);
    // derivatives.yaml: 1.0 / alpha.toFloat(), alpha rounded to float32 first
    case kCelu: return at::elu_backward(g, arg, 1, 1.0 / static_cast<double>(static_cast<float>(arg)), false, x);
    default: return at::elu_backward(g, kSeluAlpha, kSeluScale, 1, false, x);
  }
}

// CELU's alpha must round to a finite float32, as recompute.py's struct.pack requires.
bool act_served(Act act, double arg) {
  return act != kUnknown && (act != kCelu || std::isfinite(static_cast<float>(arg)));
}

bool all_plain(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    if (t->defined() && !plain_cpu(*t)) return false;
  }
  return true;
}

bool any_requires_grad(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    if (t->defined() && t->requires_grad()) return true;
  }
  return false;
}

at::Tensor value(const OptTensor& t) { return t.has_value() ? *t : at::Tensor(); }

// ----------------------------------------------------------------------------------- BatchNorm again
// recompute._batch_norm_from_stats: whether the CPU kernel's bits come back from addcmul, asked
// of recompute.py once per dtype (graph_rewrite::_batch_norm_rebuild_exact runs the check there).
bool rebuild_exact(at::ScalarType dtype) {
  static std::atomic<int8_t> known[static_cast<int>(at::ScalarType::NumOptions)] = {};
  auto& k = known[static_cast<int>(dtype)];
  int8_t v = k.load();
  if (v == 0) {
    static auto ask = twin<bool(const at::Tensor&)>("graph_rewrite::_batch_norm_rebuild_exact");
    v = ask.call(at::empty({0}, at::dtype(dtype))) ? 1 : -1;
    k.store(v);
  }
  return v > 0;
}

bool batch_norm_fast_layout(const at::Tensor& z) {
  return z.is_contiguous() || (z.dim() == 4 && z.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
         (z.dim() == 5 && z.is_contiguous(at::MemoryFormat::ChannelsLast3d));
}

// h = z * alpha + beta, alpha = invstd * weight, beta = bias - mean * alpha; undefined where that is
// not known to be the kernel's bits.
at::Tensor batch_norm_from_stats(const at::Tensor& z, at::Tensor weight, at::Tensor bias, const at::Tensor& mean,
                                 const at::Tensor& invstd) {
  const auto dtype = z.scalar_type();
  if (z.device().type() != at::kCPU || z.dim() < 2 || !batch_norm_fast_layout(z)) return {};
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&weight, &bias, &mean, &invstd}) {
    if (t->defined() && (t->scalar_type() != dtype || !t->is_contiguous())) return {};
  }
  if (!rebuild_exact(dtype)) return {};
  const int64_t c = z.size(1);
  if (!weight.defined()) weight = at::ones({c}, at::dtype(dtype));
  if (!bias.defined()) bias = at::zeros({c}, at::dtype(dtype));
  at::Tensor alpha = at::mul(invstd, weight);
  at::Tensor beta = at::addcmul(bias, mean, alpha, -1);
  std::vector<int64_t> shape(z.dim() - 1, 1);
  shape[0] = c;
  return at::addcmul(beta.view(shape), z, alpha.view(shape));
}

// A node's own data, kept in its saved_data as one capsule: cheaper per call than an entry per field.
template <class T>
c10::intrusive_ptr<T> state(AutogradContext* ctx) {
  return c10::static_intrusive_pointer_cast<T>(ctx->saved_data["state"].toCapsule());
}

template <class T>
void keep(AutogradContext* ctx, c10::intrusive_ptr<T> s) {
  ctx->saved_data["state"] = c10::IValue::make_capsule(std::move(s));
}

// A lean norm_act's state, shared with its consumers; ``h`` caches the BatchNorm's output between
// their backward and its own.
struct NormState : torch::CustomClassHolder {
  bool training = false;
  double eps = 0.0;
  int64_t buffers = -1;  // the running statistics' length, or -1 without them
  at::ScalarType buffers_dtype = at::kFloat;
  at::Tensor h;
  // The node's saved tensors (z, weight, bias, first, second), held weakly for its consumers, as
  // recompute._tensors_for_consumers does: unpacking them from the node in forward would run
  // the saved-tensor hooks' unpack (an offloading hook's copy back) for nothing. Under such hooks
  // the node keeps packed copies only, and these are gone once forward drops them.
  std::vector<c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>> for_consumers;
  std::vector<bool> defined;

  void keep_for_consumers(const variable_list& tensors) {
    for (const at::Tensor& t : tensors) {
      for_consumers.emplace_back(t.getIntrusivePtr());
      defined.push_back(t.defined());
    }
  }

  // The same tensors, or none if one has been freed since.
  std::optional<variable_list> tensors_for_consumers() const {
    variable_list out;
    for (size_t i = 0; i < for_consumers.size(); ++i) {
      auto t = for_consumers[i].lock();
      if (defined[i] && !t) return std::nullopt;
      out.emplace_back(std::move(t));
    }
    return out;
  }
};

// recompute._norm_again: h = BatchNorm(z) again, from (z, weight, bias, first, second).
at::Tensor norm_again(const NormState& norm, const variable_list& t) {
  const at::Tensor &z = t[0], &weight = t[1], &bias = t[2], &first = t[3], &second = t[4];
  const bool training = norm.training;
  if (training && first.defined() && !at::GradMode::is_enabled()) {
    at::Tensor h = batch_norm_from_stats(z, weight, bias, first, second);
    if (h.defined()) return h;
  }
  // Forward ran without autocast (the C++ kernels serve no autocast), so its recompute does too.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  at::Tensor running_mean = training ? at::Tensor() : first, running_var = training ? at::Tensor() : second;
  const int64_t c = norm.buffers;
  if (training && c >= 0) {  // throwaway buffers: forward has updated the real ones since
    auto options = at::TensorOptions().dtype(norm.buffers_dtype).device(z.device());
    running_mean = at::zeros({c}, options);
    running_var = at::ones({c}, options);
  }
  return at::batch_norm(z, weight, bias, running_mean, running_var, training, 0.0, norm.eps,
                        at::globalContext().userEnabledCuDNN());
}

// recompute.norm_output: once per backward for the norm_act and its consumers; not cached when
// differentiable (create_graph). ``tensors()`` gives (z, weight, bias, first, second), asked only
// when they are needed: unpacking runs the saved-tensor hooks, as often as recompute.py does.
template <class Tensors>
at::Tensor norm_output(NormState& norm, const Tensors& tensors) {
  if (at::GradMode::is_enabled()) return norm_again(norm, tensors());
  if (!norm.h.defined()) norm.h = norm_again(norm, tensors());
  return norm.h;
}

// A node's activation: recompute.ACTIVATIONS[act] with its act_arg.
struct ActState : torch::CustomClassHolder {
  int64_t act = kSilu;
  double arg = 0.0;
  c10::intrusive_ptr<NormState> norm;  // a norm_act's, when lean; a consumer's producer's
};

// ----------------------------------------------------------------------------------- norm -> activation
struct LeanNormAct : public torch::autograd::Function<LeanNormAct> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& z, int64_t act,
                            const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
                            const OptTensor& running_var, double eps, double act_arg) {
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = act_forward(act, h, act_arg);
    }
    auto st = c10::make_intrusive<ActState>();
    st->act = act;
    st->arg = act_arg;
    keep(ctx, st);
    // recompute._batch_norm_training: only a CPU BatchNorm's node says how it ran.
    auto* bn = dynamic_cast<torch::autograd::generated::NativeBatchNormBackward0*>(h.grad_fn().get());
    if (bn == nullptr) {  // not known to come from the norm: keep h, as native does
      ctx->save_for_backward({h});
      return out;
    }
    at::Tensor first = value(running_mean), second = value(running_var);
    if (bn->training) {  // the batch mean and invstd the BatchNorm node keeps (the same storages)
      try {
        first = bn->result1_.unpack(h.grad_fn());
        second = bn->result2_.unpack(h.grad_fn());
      } catch (const c10::Error&) {
        first = second = at::Tensor();
      }
    }
    st->norm = c10::make_intrusive<NormState>();
    st->norm->training = bn->training;
    st->norm->eps = eps;
    if (running_mean.has_value() && running_mean->defined()) {
      st->norm->buffers = running_mean->size(0);
      st->norm->buffers_dtype = running_mean->scalar_type();
    }
    variable_list kept{z, value(weight), value(bias), first, second};
    st->norm->keep_for_consumers(kept);
    ctx->save_for_backward(std::move(kept));
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad = grads[0];
    auto st = state<ActState>(ctx);
    const int64_t act = st->act;
    const double arg = st->arg;
    at::Tensor h;
    if (st->norm) {
      h = norm_output(*st->norm, [ctx] { return ctx->get_saved_variables(); });
      st->norm->h = at::Tensor();  // the consumers are done with it
    } else {
      h = ctx->get_saved_variables()[0];
    }
    variable_list out(9);
    if (!at::GradMode::is_enabled()) {  // the usual backward: the activation's kernel, at h
      out[0] = act_backward(act, grad, h, arg);
    } else {  // create_graph: through autograd, so that it can be differentiated again
      at::Tensor h_in = h.requires_grad() ? h : h.detach().requires_grad_();
      out[0] = torch::autograd::grad({act_forward(act, h_in, arg)}, {h_in}, {grad}, true, true)[0];
    }
    return out;
  }
};

using NormActSig = at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view, const OptTensor&,
                              const OptTensor&, const OptTensor&, const OptTensor&, double, double, int64_t);

at::Tensor norm_act(const at::Tensor& h, const at::Tensor& z, c10::string_view act_name, const OptTensor& weight,
                    const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var, double eps,
                    double act_arg, int64_t groups) {
  const Act act = act_of(act_name);
  const at::Tensor w = value(weight), b = value(bias), rm = value(running_mean), rv = value(running_var);
  if (groups != 0 || !act_served(act, act_arg) || !floating(h) || !all_plain({&h, &z, &w, &b, &rm, &rv})) {
    static auto python = twin<NormActSig>("graph_rewrite::_norm_act_python");
    return python.call(h, z, act_name, weight, bias, running_mean, running_var, eps, act_arg, groups);
  }
  if (at::GradMode::is_enabled() && h.requires_grad()) {
    return LeanNormAct::apply(h, z, static_cast<int64_t>(act), weight, bias, running_mean, running_var, eps, act_arg);
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return act_forward(act, h, act_arg);
}

// ----------------------------------------------------------------------------------- consumers
// recompute._save / _unpack / _act_input. A consumer of a C++ norm_act's output keeps no x: it keeps
// that node and its NormState, and the node's tensors while they are alive (the same storages: no
// new bytes), for a backward in which the node has run first and freed its own. Any other keeps x.

// The C++ norm_act that made h and its NormState, if it kept z rather than h; nulls otherwise.
std::pair<NodePtr, c10::intrusive_ptr<NormState>> lean_producer(const at::Tensor& h) {
  const auto& node = h.grad_fn();
  auto* norm_act = dynamic_cast<CppNode<LeanNormAct>*>(node.get());
  if (norm_act == nullptr) return {};
  auto norm = state<ActState>(&norm_act->ctx_)->norm;
  return {norm ? node : NodePtr(), norm};
}

// Whether h was made by a Python autograd.Function: it may be a lean producer only Python knows
// (recompute_module, a norm_act that went to Python), so the consumer goes to Python too.
bool made_in_python(const at::Tensor& h) {
  const auto* node = h.grad_fn().get();
  return node != nullptr && std::strstr(typeid(*node).name(), "PyNode") != nullptr;
}

// A consumer's data: its activation, how many of its saved tensors are its own, the geometry and
// dtype of forward's h, and the layer's arguments.
struct ConsumerState : ActState {
  NodePtr producer;  // a lean norm_act, or null
  int64_t own = 1;
  std::vector<int64_t> sizes, strides;
  int64_t offset = 0;
  at::ScalarType h_dtype = at::kFloat;
  bool has_bias = false, addmm = false;
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups = 1;
};

c10::intrusive_ptr<ConsumerState> consumer_state(AutogradContext* ctx, int64_t act, double arg, const at::Tensor& h) {
  auto st = c10::make_intrusive<ConsumerState>();
  st->act = act;
  st->arg = arg;
  st->sizes = h.sizes().vec();
  st->strides = h.strides().vec();
  st->offset = h.storage_offset();
  st->h_dtype = h.scalar_type();
  keep(ctx, st);
  return st;
}

void save_consumer(AutogradContext* ctx, ConsumerState& st, const at::Tensor& x, const at::Tensor& h,
                   variable_list rest, bool producer_allowed = true) {
  if (producer_allowed) std::tie(st.producer, st.norm) = lean_producer(h);
  st.own = static_cast<int64_t>(rest.size() + 1);
  variable_list saved{st.producer ? at::Tensor() : x};
  saved.insert(saved.end(), rest.begin(), rest.end());
  if (st.producer) {
    if (auto tensors = st.norm->tensors_for_consumers()) saved.insert(saved.end(), tensors->begin(), tensors->end());
  }
  ctx->save_for_backward(saved);
}

// (x or undefined, the consumer's own tensors...) and the activation's input: x, or the norm's output.
std::pair<variable_list, at::Tensor> unpack_consumer(AutogradContext* ctx, ConsumerState& st) {
  variable_list saved = ctx->get_saved_variables();
  if (!st.producer) return {saved, saved[0]};
  at::Tensor a = norm_output(*st.norm, [&] {
    variable_list tensors(saved.begin() + st.own, saved.end());
    return tensors.empty() ? static_cast<CppNode<LeanNormAct>*>(st.producer.get())->ctx_.get_saved_variables()
                           : tensors;
  });
  saved.resize(st.own);
  return {saved, a};
}

at::Tensor recompute(const ConsumerState& st, const at::Tensor& a) { return act_forward(st.act, a, st.arg); }

// recompute._as_geometry: laid out as forward's h was.
at::Tensor as_geometry(const ConsumerState& st, const at::Tensor& u) {
  if (u.sizes() == at::IntArrayRef(st.sizes) && u.strides() == at::IntArrayRef(st.strides) &&
      u.storage_offset() == st.offset) {
    return u;
  }
  return u.as_strided(st.sizes, st.strides, st.offset);
}

// ----------------------------------------------------------------------------------- convolution
at::Tensor conv(const at::Tensor& h, const at::Tensor& weight, const OptTensor& bias, at::IntArrayRef stride,
                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  switch (weight.dim()) {
    case 3: return at::conv1d(h, weight, bias, stride, padding, dilation, groups);
    case 4: return at::conv2d(h, weight, bias, stride, padding, dilation, groups);
    default: return at::conv3d(h, weight, bias, stride, padding, dilation, groups);
  }
}

struct LeanConv : public torch::autograd::Function<LeanConv> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& h, int64_t act,
                            const at::Tensor& weight, const OptTensor& bias, std::vector<int64_t> stride,
                            std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups,
                            double act_arg) {
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = conv(h, weight, bias, stride, padding, dilation, groups);
    }
    auto st = consumer_state(ctx, act, act_arg, h);
    st->has_bias = bias.has_value() && bias->defined();
    st->stride = std::move(stride);
    st->padding = std::move(padding);
    st->dilation = std::move(dilation);
    st->groups = groups;
    save_consumer(ctx, *st, x, h, {weight});
    return out;
  }

  // recompute.conv_backward: the kernel native's ConvolutionBackward0 calls.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto st = state<ConsumerState>(ctx);
    auto [saved, a] = unpack_consumer(ctx, *st);
    const at::Tensor& weight = saved[1];
    at::Tensor h = as_geometry(*st, recompute(*st, a)), grad = grads[0];
    const bool has_bias = st->has_bias;
    const std::array<bool, 3> mask{ctx->needs_input_grad(1), ctx->needs_input_grad(2),
                                   has_bias && ctx->needs_input_grad(3)};
    const bool unbatched = h.dim() == weight.dim() - 1;
    if (unbatched) {
      grad = grad.unsqueeze(0);
      h = h.unsqueeze(0);
    }
    const int64_t n = weight.dim() - 2;
    std::vector<int64_t> bias_sizes{weight.size(0)};
    auto [gh, gw, gb] = at::convolution_backward(
        grad, h, weight, has_bias ? at::OptionalIntArrayRef(bias_sizes) : std::nullopt,
        st->stride, st->padding, st->dilation, false, std::vector<int64_t>(n, 0), st->groups, mask);
    if (unbatched && gh.defined()) gh = gh.squeeze(0);
    variable_list out(10);
    out[1] = gh;
    out[3] = gw;
    out[4] = has_bias ? gb : at::Tensor();
    return out;
  }
};

using ConvSig = at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view, const at::Tensor&, const OptTensor&,
                           at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, double, at::IntArrayRef,
                           const OptTensor&, const OptTensor&);

at::Tensor recompute_conv(const at::Tensor& x, const at::Tensor& h, c10::string_view act_name, const at::Tensor& weight,
                          const OptTensor& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, int64_t groups, double act_arg, at::IntArrayRef norm_shape,
                          const OptTensor& norm_weight, const OptTensor& norm_bias) {
  const Act act = act_of(act_name);
  const at::Tensor b = value(bias);
  if (!act_served(act, act_arg) || !norm_shape.empty() || value(norm_weight).defined() ||
      value(norm_bias).defined() || !floating(h) || !all_plain({&x, &h, &weight, &b}) || made_in_python(h)) {
    static auto python = twin<ConvSig>("graph_rewrite::_recompute_conv_python");
    return python.call(x, h, act_name, weight, bias, stride, padding, dilation, groups, act_arg, norm_shape,
                       norm_weight, norm_bias);
  }
  if (at::GradMode::is_enabled() && any_requires_grad({&x, &h, &weight, &b})) {
    return LeanConv::apply(x, h, static_cast<int64_t>(act), weight, bias, stride.vec(), padding.vec(), dilation.vec(),
                           groups, act_arg);
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return conv(h, weight, bias, stride, padding, dilation, groups);
}

// ----------------------------------------------------------------------------------- mul
// recompute._reduce_to: what autograd's engine does to a broadcast operand's gradient.
at::Tensor reduce_to(at::Tensor g, at::IntArrayRef shape, at::ScalarType dtype) {
  if (g.sizes() != shape) g = g.sum_to_size(shape);
  return g.scalar_type() == dtype ? g : g.to(dtype);
}

struct LeanMul : public torch::autograd::Function<LeanMul> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& h, int64_t act,
                            const at::Tensor& other, double act_arg) {
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = at::mul(h, other);
    }
    auto st = consumer_state(ctx, act, act_arg, h);
    save_consumer(ctx, *st, x, h, {other});
    return out;
  }

  // recompute.mul_backward: h only for other's gradient.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad = grads[0];
    const bool needs_h = ctx->needs_input_grad(1), needs_other = ctx->needs_input_grad(2);
    auto st = state<ConsumerState>(ctx);
    variable_list saved;
    at::Tensor a;
    if (needs_other) {
      std::tie(saved, a) = unpack_consumer(ctx, *st);
    } else {
      saved = ctx->get_saved_variables();
    }
    const at::Tensor& other = saved[1];
    variable_list out(5);
    if (needs_h) out[1] = reduce_to(grad * other, st->sizes, st->h_dtype);
    if (needs_other) out[3] = reduce_to(grad * recompute(*st, a), other.sizes(), other.scalar_type());
    return out;
  }
};

using MulSig = at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view, const at::Tensor&, double);

at::Tensor recompute_mul(const at::Tensor& x, const at::Tensor& h, c10::string_view act_name, const at::Tensor& other,
                         double act_arg) {
  const Act act = act_of(act_name);
  if (!act_served(act, act_arg) || !floating(h) || !all_plain({&x, &h, &other}) || made_in_python(h)) {
    static auto python = twin<MulSig>("graph_rewrite::_recompute_mul_python");
    return python.call(x, h, act_name, other, act_arg);
  }
  if (at::GradMode::is_enabled() && any_requires_grad({&x, &h, &other})) {
    return LeanMul::apply(x, h, static_cast<int64_t>(act), other, act_arg);
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return at::mul(h, other);
}

// ----------------------------------------------------------------------------------- linear
at::Tensor rows(const at::Tensor& h) {
  auto sizes = h.sizes();
  return h.view({c10::multiply_integers(sizes.begin(), sizes.end() - 1), sizes.back()});
}

at::Tensor linear(const at::Tensor& h, const at::Tensor& weight, const OptTensor& bias, bool addmm) {
  // HF's Conv1D (GPT-2): addmm(bias, h.view(-1, k), weight), weight laid out (k, n)
  return addmm ? at::addmm(value(bias), rows(h), weight) : at::linear(h, weight, bias);
}

struct LeanLinear : public torch::autograd::Function<LeanLinear> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& h, int64_t act,
                            const at::Tensor& weight, const OptTensor& bias, const OptTensor& gate, double act_arg,
                            bool addmm) {
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = linear(h, weight, bias, addmm);
    }
    auto st = consumer_state(ctx, act, act_arg, h);
    st->addmm = addmm;
    st->has_bias = bias.has_value() && bias->defined();
    const at::Tensor g = value(gate);  // with a gate, h is act(x) * gate: x is kept, as Python does
    save_consumer(ctx, *st, x, h, {weight, g}, /*producer_allowed=*/!g.defined());
    return out;
  }

  // recompute.linear_backward and addmm_backward: as native's addmm backward forms them.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto st = state<ConsumerState>(ctx);
    auto [saved, a] = unpack_consumer(ctx, *st);
    const at::Tensor &weight = saved[1], &gate = saved[2], &grad = grads[0];
    at::Tensor h = recompute(*st, a);
    if (gate.defined()) h = h * gate;
    h = as_geometry(*st, h);
    const bool has_bias = st->has_bias;
    const bool needs_h = ctx->needs_input_grad(1), needs_w = ctx->needs_input_grad(2),
               needs_b = has_bias && ctx->needs_input_grad(3);
    at::Tensor gh, gw, gb;
    if (st->addmm) {
      at::Tensor h2 = rows(h);
      if (needs_h) gh = grad.mm(weight.t()).view(h.sizes());
      if (needs_w) {
        const bool column_major = weight.stride(0) == 1 && weight.stride(1) == weight.size(0);
        gw = column_major ? grad.t().mm(h2).t() : h2.t().mm(grad);
      }
      if (needs_b) gb = grad.sum_to_size(grad.sizes().slice(grad.dim() - 1));
    } else {
      auto hs = h.sizes();
      const int64_t n = c10::multiply_integers(hs.begin(), hs.end() - 1);
      at::Tensor g2 = grad.reshape({n, grad.size(-1)});
      if (needs_h) gh = g2.mm(weight).view(hs);
      if (needs_w) gw = g2.t().mm(h.reshape({n, h.size(-1)}));
      if (needs_b) gb = g2.sum_to_size(grad.sizes().slice(grad.dim() - 1));
    }
    variable_list out(8);
    out[1] = gh;
    out[3] = gw;
    out[4] = gb;
    return out;
  }
};

using LinearSig = at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view, const at::Tensor&,
                             const OptTensor&, const OptTensor&, double, at::IntArrayRef, const OptTensor&,
                             const OptTensor&, bool);

at::Tensor recompute_linear(const at::Tensor& x, const at::Tensor& h, c10::string_view act_name,
                            const at::Tensor& weight, const OptTensor& bias, const OptTensor& gate, double act_arg,
                            at::IntArrayRef norm_shape, const OptTensor& norm_weight, const OptTensor& norm_bias,
                            bool addmm) {
  const Act act = act_of(act_name);
  const at::Tensor b = value(bias), g = value(gate);
  if (!act_served(act, act_arg) || !norm_shape.empty() || value(norm_weight).defined() ||
      value(norm_bias).defined() || !floating(h) || !all_plain({&x, &h, &weight, &b, &g}) ||
      (!g.defined() && made_in_python(h)) ||
      // at::linear called here on a strided 3-D h (a transposed activation) rounds otherwise than
      // the same call from Python: the Python kernel gives native's bits.
      (!addmm && h.dim() > 2 && !h.is_contiguous())) {
    static auto python = twin<LinearSig>("graph_rewrite::_recompute_linear_python");
    return python.call(x, h, act_name, weight, bias, gate, act_arg, norm_shape, norm_weight, norm_bias, addmm);
  }
  if (at::GradMode::is_enabled() && any_requires_grad({&x, &h, &weight, &b, &g})) {
    return LeanLinear::apply(x, h, static_cast<int64_t>(act), weight, bias, gate, act_arg, addmm);
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return linear(h, weight, bias, addmm);
}

void register_recompute(torch::Library& lib) {
  lib.impl("norm_act", TORCH_FN(norm_act));
  lib.impl("recompute_conv", TORCH_FN(recompute_conv));
  lib.impl("recompute_mul", TORCH_FN(recompute_mul));
  lib.impl("recompute_linear", TORCH_FN(recompute_linear));
}

}  // namespace graph_rewrite
