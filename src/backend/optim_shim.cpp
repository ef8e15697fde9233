// libtorch entry points that tch does not bind: the multi-tensor optimizer kernels (the
// `_fused_*` and `_foreach_*` ATen ops that torch.optim uses with fused=True / foreach=True,
// src/optim/mod.rs), oneDNN's packed convolution (src/nn/packed.rs) and per-device autocast
// (src/nn/precision.rs). Entry points take tch tensor handles (`torch::Tensor*`, tch's
// C_tensor), run under a NoGradGuard, catch every C++ exception and return 0 on success or
// 1 with the message in `err` (NUL-terminated, truncated to `err_len`).
#include <ATen/core/Tensor.h>
#include <ATen/ops/_foreach_abs.h>
#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/_foreach_addcdiv.h>
#include <ATen/ops/_foreach_clamp_max.h>
#include <ATen/ops/_foreach_clamp_min.h>
#include <ATen/ops/_foreach_lerp.h>
#include <ATen/ops/_foreach_maximum.h>
#include <ATen/ops/_foreach_mul.h>
#include <ATen/ops/_foreach_norm.h>
#include <ATen/ops/_fused_adam.h>
#include <ATen/ops/_fused_sgd.h>
#include <ATen/ops/full.h>
#include <ATen/ops/stack.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/Context.h>
#include <ATen/autocast_mode.h>

#include <cstdio>
#include <exception>
#include <vector>

namespace {

std::vector<at::Tensor> list(at::Tensor **ts, size_t n) {
    std::vector<at::Tensor> v;
    v.reserve(n);
    for (size_t i = 0; i < n; ++i) v.push_back(*ts[i]);
    return v;
}

// The fused kernels write the parameters without passing through autograd's
// ADInplaceOrView layer, so their version counters would not move: bump them, so that
// whoever caches something derived from a parameter (nn::packed's packed conv weights)
// sees the update.
void bump_versions(at::Tensor **params, size_t n) {
    for (size_t i = 0; i < n; ++i) params[i]->unsafeGetTensorImpl()->bump_version();
}

template <typename F> int guarded(char *err, size_t err_len, F f) {
    try {
        at::NoGradGuard no_grad;
        f();
        return 0;
    } catch (const std::exception &e) {
        if (err && err_len) std::snprintf(err, err_len, "%s", e.what());
    } catch (...) {
        if (err && err_len) std::snprintf(err, err_len, "unknown C++ exception");
    }
    return 1;
}

}  // namespace

extern "C" {

// Drops the gradients (set to undefined, as torch's zero_grad(set_to_none=True)).
int lumos_optim_drop_grads(at::Tensor **params, size_t n, char *err, size_t err_len) {
    return guarded(err, err_len, [&] {
        for (size_t i = 0; i < n; ++i) params[i]->mutable_grad().reset();
    });
}

// The L2 norm of all tensors together (as one vector), in double.
int lumos_optim_total_norm(at::Tensor **ts, size_t n, double *out, char *err, size_t err_len) {
    return guarded(err, err_len, [&] {
        *out = 0.0;
        if (n == 0) return;
        auto norms = at::_foreach_norm(list(ts, n), 2);
        *out = at::stack(norms).norm().item<double>();
    });
}

// ts[i] *= s, in place.
int lumos_optim_scale(at::Tensor **ts, size_t n, double s, char *err, size_t err_len) {
    return guarded(err, err_len, [&] {
        if (n) at::_foreach_mul_(list(ts, n), s);
    });
}

// ts[i] = clamp(ts[i], lo, hi), in place.
int lumos_optim_clamp(at::Tensor **ts, size_t n, double lo, double hi, char *err, size_t err_len) {
    return guarded(err, err_len, [&] {
        if (!n) return;
        auto v = list(ts, n);
        at::_foreach_clamp_min_(v, lo);
        at::_foreach_clamp_max_(v, hi);
    });
}

// SGD with momentum (dampening 0), PyTorch's update: buf = momentum * buf + g (buffers
// start as zeros, so the first step's buffer is g); Nesterov steps along g + momentum * buf.
int lumos_optim_fused_sgd(at::Tensor **params, at::Tensor **grads, at::Tensor **bufs, size_t n, double weight_decay,
                          double momentum, double lr, int nesterov, char *err, size_t err_len) {
    return guarded(err, err_len, [&] {
        if (!n) return;
        at::_fused_sgd_(list(params, n), list(grads, n), list(bufs, n), weight_decay, momentum, lr, 0.0,
                        nesterov != 0, false, false);
        bump_versions(params, n);
    });
}

// Adam (no weight decay, no amsgrad) at step `step` (1 on the first update).
int lumos_optim_fused_adam(at::Tensor **params, at::Tensor **grads, at::Tensor **m, at::Tensor **v, size_t n,
                           double step, double lr, double beta1, double beta2, double eps, char *err,
                           size_t err_len) {
    return guarded(err, err_len, [&] {
        if (!n) return;
        std::vector<at::Tensor> steps;
        steps.reserve(n);
        for (size_t i = 0; i < n; ++i)
            steps.push_back(at::full({}, step, params[i]->options().dtype(at::kFloat)));
        at::_fused_adam_(list(params, n), list(grads, n), list(m, n), list(v, n), {}, steps, lr, beta1, beta2, 0.0,
                         eps, false, false);
        bump_versions(params, n);
    });
}

// Adamax: m = lerp(m, g, 1 - beta1); u = max(beta2 * u, |g| + eps); p -= clr * m / u,
// with clr = lr / (1 - beta1^step) (torch.optim.Adamax's foreach path).
int lumos_optim_foreach_adamax(at::Tensor **params, at::Tensor **grads, at::Tensor **m, at::Tensor **u, size_t n,
                               double clr, double beta1, double beta2, double eps, char *err, size_t err_len) {
    return guarded(err, err_len, [&] {
        if (!n) return;
        auto g = list(grads, n);
        auto mv = list(m, n);
        auto uv = list(u, n);
        at::_foreach_lerp_(mv, g, 1.0 - beta1);
        auto absg = at::_foreach_abs(g);
        at::_foreach_add_(absg, eps);
        at::_foreach_mul_(uv, beta2);
        at::_foreach_maximum_(uv, absg);
        at::_foreach_addcdiv_(list(params, n), mv, uv, -clr);
        bump_versions(params, n);
    });
}

// Whether autograd records operations on this thread (torch.is_grad_enabled()).
int lumos_grad_enabled(void) { return at::GradMode::is_enabled() ? 1 : 0; }

// Whether this libtorch has oneDNN (mkldnn) CPU kernels.
int lumos_mkldnn_available(void) { return at::hasMKLDNN() ? 1 : 0; }

// A 2-D convolution of a dense CPU float input (either layout) with a weight packed by
// mkldnn_reorder_conv2d_weight into oneDNN's blocked format (libtorch's
// mkldnn::_convolution_pointwise, what torch.compile's CPU backend calls for frozen
// convolutions), no fused post-op. `bias` may be NULL. On success `*out` receives a new
// tensor handle owned by the caller (tch's Tensor::from_ptr).
int lumos_conv2d_packed(at::Tensor *x, at::Tensor *packed, at::Tensor *bias, const int64_t *padding,
                        const int64_t *stride, const int64_t *dilation, int64_t groups, at::Tensor **out, char *err,
                        size_t err_len) {
    return guarded(err, err_len, [&] {
        static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_convolution_pointwise", "");
        torch::jit::Stack stack;
        stack.reserve(10);
        stack.emplace_back(*x);
        stack.emplace_back(*packed);
        if (bias)
            stack.emplace_back(*bias);
        else
            stack.emplace_back(c10::IValue());
        stack.emplace_back(std::vector<int64_t>(padding, padding + 2));
        stack.emplace_back(std::vector<int64_t>(stride, stride + 2));
        stack.emplace_back(std::vector<int64_t>(dilation, dilation + 2));
        stack.emplace_back(groups);
        stack.emplace_back(std::string("none"));
        stack.emplace_back(c10::List<std::optional<at::Scalar>>());
        stack.emplace_back(c10::IValue());
        op.callBoxed(&stack);
        *out = new at::Tensor(stack.back().toTensor());
    });
}

// Autocast (torch.autocast) on this thread for one device type (c10::DeviceType: 0 CPU,
// 1 CUDA) to a lower-precision dtype (c10::ScalarType: 15 BFloat16, 5 Half). `enter` saves
// the previous state in *prev_enabled / *prev_dtype for `exit`, which restores it and, at
// the outermost level, clears autocast's cache of cast weights. See src/nn/precision.rs.
int lumos_autocast_enter(int device_type, int dtype, int *prev_enabled, int *prev_dtype, char *err, size_t err_len) {
    return guarded(err, err_len, [&] {
        auto dt = static_cast<at::DeviceType>(device_type);
        TORCH_CHECK(dt == at::kCPU || dt == at::kCUDA, "autocast: device type ", device_type, " is not CPU (0) or CUDA (1)");
        auto st = static_cast<at::ScalarType>(dtype);
        TORCH_CHECK(st == at::kBFloat16 || st == at::kHalf, "autocast: dtype ", dtype, " is not BFloat16 (15) or Half (5)");
        *prev_enabled = at::autocast::is_autocast_enabled(dt) ? 1 : 0;
        *prev_dtype = static_cast<int>(at::autocast::get_autocast_dtype(dt));
        at::autocast::set_autocast_dtype(dt, st);
        at::autocast::set_autocast_enabled(dt, true);
        at::autocast::increment_nesting();
    });
}

int lumos_autocast_exit(int device_type, int prev_enabled, int prev_dtype, char *err, size_t err_len) {
    return guarded(err, err_len, [&] {
        auto dt = static_cast<at::DeviceType>(device_type);
        if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
        at::autocast::set_autocast_enabled(dt, prev_enabled != 0);
        at::autocast::set_autocast_dtype(dt, static_cast<at::ScalarType>(prev_dtype));
    });
}

// Whether autocast is on for this device type on this thread.
int lumos_autocast_enabled(int device_type) {
    return at::autocast::is_autocast_enabled(static_cast<at::DeviceType>(device_type)) ? 1 : 0;
}

// The dtype autocast casts to for this device type on this thread (c10::ScalarType code).
int lumos_autocast_dtype(int device_type) {
    return static_cast<int>(at::autocast::get_autocast_dtype(static_cast<at::DeviceType>(device_type)));
}

}  // extern "C"
