// What the two kernel files share: which calls the C++ kernels serve, and how they hand the rest
// to the Python kernels (the twin ops "_<name>_python" that activations.py and recompute.py define).
#pragma once

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/forward_grad.h>
#include <torch/library.h>

namespace graph_rewrite {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// How many runtime front-end modes this thread is in: their calls take the Python kernels, whose
// nodes the mode's in-place guard can make keep a copy of the saved output (frontends/runtime.py).
extern thread_local int python_only_depth;

// A dense CPU tensor that nothing intercepts: no subclass or tracer (Python key), no functorch
// wrapper or transform, no dispatch mode, no autocast, no forward-AD dual level (the Python
// kernel takes its jvp Function under any level, as activations._transforms_active says).
inline bool plain_cpu(const at::Tensor& x) {
  static const c10::DispatchKeySet plain({c10::DispatchKey::CPU, c10::DispatchKey::AutogradCPU,
                                          c10::DispatchKey::ADInplaceOrView});
  // Every tensor carries its backend's autocast key; the TLS check below says whether autocast is on.
  return python_only_depth == 0 && x.key_set().remove(c10::DispatchKey::AutocastCPU) == plain && c10::impl::TorchDispatchModeTLS::stack_len() == 0 &&
         !c10::impl::tls_local_dispatch_key_set().included_.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) &&
         !at::autocast::is_autocast_enabled(at::kCPU) && !torch::autograd::ForwardADLevel::has_any_level();
}

inline bool floating(const at::Tensor& x) {
  auto s = x.scalar_type();
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

// The op ``name`` (a Python twin), called through the dispatcher from the top.
template <class Signature>
c10::TypedOperatorHandle<Signature> twin(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// recompute_ops.cpp: the Autograd kernels of norm_act and the recompute consumers.
void register_recompute(torch::Library& lib);

}  // namespace graph_rewrite
