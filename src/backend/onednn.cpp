// Training convolutions in oneDNN's blocked layout (src/nn/onednn.rs): convolution,
// transposed convolution and a fused InstanceNorm + LeakyReLU as autograd functions over
// activations that stay in oneDNN's nChw16c layout from one layer to the next.
//
// Why: libtorch's CPU convolutions take and return plain NCHW tensors, so each convolution
// reorders its input to oneDNN's blocked layout and its output back, forward and in both
// backward passes (a large share of a convolution's time: docs/engine-notes.md). Kept blocked between layers, the
// activations are dense 5-d tensors (N, C/16, H, W, 16) that autograd carries like any
// other; libtorch's own oneDNN cannot be called (it is linked statically with hidden
// symbols), so this file calls a oneDNN 3.x library of its own, loaded with dlopen on first
// use (libdnnl.so.3, found through the binary's RUNPATH, or the file named by
// LUMOS_ONEDNN). Without it every entry point fails with a message and the caller keeps
// libtorch's operators.
//
// Entry points take tch tensor handles (torch::Tensor*), catch every C++ exception and
// return 0, or 1 with the message in `err`.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <oneapi/dnnl/dnnl.h>

#ifdef _WIN32
#include <windows.h>
#else
#include <dlfcn.h>
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LUMOS_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LUMOS_CLONES
#endif

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ---------------------------------------------------------------------------------------
// The oneDNN C API, resolved at run time. The declarations come from libtorch's copy of
// the oneDNN 3.x headers; only the v3 C API's stable entry points are used.

#define LUMOS_DNNL_FNS(X)                                        \
    X(dnnl_version)                                              \
    X(dnnl_engine_create)                                        \
    X(dnnl_stream_create)                                        \
    X(dnnl_memory_desc_create_with_tag)                          \
    X(dnnl_memory_desc_destroy)                                  \
    X(dnnl_memory_desc_equal)                                    \
    X(dnnl_memory_desc_get_size)                                 \
    X(dnnl_primitive_attr_create)                                \
    X(dnnl_primitive_attr_destroy)                               \
    X(dnnl_primitive_attr_set_scratchpad_mode)                   \
    X(dnnl_convolution_forward_primitive_desc_create)            \
    X(dnnl_convolution_backward_data_primitive_desc_create)      \
    X(dnnl_convolution_backward_weights_primitive_desc_create)   \
    X(dnnl_deconvolution_forward_primitive_desc_create)          \
    X(dnnl_deconvolution_backward_data_primitive_desc_create)    \
    X(dnnl_deconvolution_backward_weights_primitive_desc_create) \
    X(dnnl_reorder_primitive_desc_create)                        \
    X(dnnl_primitive_desc_query_md)                              \
    X(dnnl_primitive_desc_query)                                 \
    X(dnnl_primitive_desc_destroy)                               \
    X(dnnl_primitive_create)                                     \
    X(dnnl_primitive_destroy)                                    \
    X(dnnl_primitive_execute)                                    \
    X(dnnl_memory_create)                                        \
    X(dnnl_memory_destroy)                                       \
    X(dnnl_stream_wait)

struct Api {
#define LUMOS_FIELD(f) decltype(&::f) f = nullptr;
    LUMOS_DNNL_FNS(LUMOS_FIELD)
#undef LUMOS_FIELD
    dnnl_engine_t engine = nullptr;
    std::string error;  // empty when loaded
    std::string version;
};

// oneDNN 3.x under its platform's library name
#if defined(_WIN32)
constexpr const char *kDefaultName = "dnnl.dll";
#elif defined(__APPLE__)
constexpr const char *kDefaultName = "libdnnl.3.dylib";
#else
constexpr const char *kDefaultName = "libdnnl.so.3";
#endif

// The library file to load instead of kDefaultName; set by lumos_onednn_available before
// the first load.
std::string g_library;

Api load_api() {
    Api a;
    const char *name = g_library.empty() ? kDefaultName : g_library.c_str();
#ifdef _WIN32
    void *h = reinterpret_cast<void *>(LoadLibraryA(name));
    if (!h) {
        a.error = std::string("cannot load ") + name + ": LoadLibrary error " + std::to_string(GetLastError());
        return a;
    }
#define LUMOS_SYM(h, f) reinterpret_cast<void *>(GetProcAddress(static_cast<HMODULE>(h), f))
#else
    void *h = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        const char *e = dlerror();
        a.error = std::string("cannot load ") + name + ": " + (e ? e : "unknown error");
        return a;
    }
#define LUMOS_SYM(h, f) dlsym(h, f)
#endif
#define LUMOS_LOAD(f)                                                   \
    a.f = reinterpret_cast<decltype(&::f)>(LUMOS_SYM(h, #f));           \
    if (!a.f) {                                                         \
        a.error = std::string(name) + " lacks the function " #f;        \
        return a;                                                       \
    }
    LUMOS_DNNL_FNS(LUMOS_LOAD)
#undef LUMOS_LOAD
    const dnnl_version_t *v = a.dnnl_version();
    a.version = std::to_string(v->major) + "." + std::to_string(v->minor) + "." + std::to_string(v->patch);
    if (v->major != 3) {
        a.error = std::string(name) + " is oneDNN " + a.version + "; expected oneDNN 3.x";
        return a;
    }
    if (a.dnnl_engine_create(&a.engine, dnnl_cpu, 0) != dnnl_success) {
        a.error = "oneDNN could not create a CPU engine";
        return a;
    }
    return a;
}

const Api &api() {
    static const Api a = load_api();
    return a;
}

const Api &need_api() {
    const Api &a = api();
    TORCH_CHECK(a.error.empty(), "oneDNN unavailable: ", a.error);
    return a;
}

#define DNNL_CHECK(call, what)                                                              \
    do {                                                                                    \
        dnnl_status_t st_ = (call);                                                         \
        TORCH_CHECK(st_ == dnnl_success, "oneDNN: ", what, " failed (status ", int(st_), ")"); \
    } while (0)

// Owning wrappers.
struct Md {
    dnnl_memory_desc_t md = nullptr;
    Md() = default;
    Md(const std::vector<int64_t> &dims, dnnl_format_tag_t tag) {
        dnnl_dims_t d{};
        for (size_t i = 0; i < dims.size(); ++i) d[i] = dims[i];
        DNNL_CHECK(need_api().dnnl_memory_desc_create_with_tag(&md, int(dims.size()), d, dnnl_f32, tag),
                   "memory descriptor");
    }
    Md(const Md &) = delete;
    Md &operator=(const Md &) = delete;
    ~Md() {
        if (md) api().dnnl_memory_desc_destroy(md);
    }
};

struct Prim {
    dnnl_primitive_desc_t pd = nullptr;
    dnnl_primitive_t p = nullptr;
    Prim() = default;
    Prim(const Prim &) = delete;
    Prim &operator=(const Prim &) = delete;
    ~Prim() {
        if (p) api().dnnl_primitive_destroy(p);
        if (pd) api().dnnl_primitive_desc_destroy(pd);
    }
    void create(const char *what) {
        TORCH_CHECK(pd, "oneDNN: no primitive descriptor for ", what);
        DNNL_CHECK(api().dnnl_primitive_create(&p, pd), what);
    }
    const_dnnl_memory_desc_t md(dnnl_query_t q, int i = 0) const { return api().dnnl_primitive_desc_query_md(pd, q, i); }
    std::string impl() const {
        const char *s = nullptr;
        api().dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &s);
        return s ? s : "?";
    }
};

dnnl_primitive_attr_t user_scratchpad_attr() {
    // the scratchpad comes from libtorch's allocator at each call, so that concurrent calls
    // of one primitive (two trainings in one process) never share one
    static dnnl_primitive_attr_t attr = [] {
        dnnl_primitive_attr_t a = nullptr;
        DNNL_CHECK(need_api().dnnl_primitive_attr_create(&a), "primitive attributes");
        DNNL_CHECK(api().dnnl_primitive_attr_set_scratchpad_mode(a, dnnl_scratchpad_mode_user), "scratchpad mode");
        return a;
    }();
    return attr;
}

// Executes `p` with (arg, memory desc, data pointer) triples; the memory objects wrap the
// tensors' storage for the call only.
struct Arg {
    int arg;
    const_dnnl_memory_desc_t md;
    void *ptr;
};

void execute(const Prim &p, std::vector<Arg> args, const char *what) {
    const Api &a = need_api();
    const_dnnl_memory_desc_t sp = p.md(dnnl_query_scratchpad_md);
    at::Tensor scratch;
    if (sp && a.dnnl_memory_desc_get_size(sp) > 0) {
        scratch = at::empty({int64_t(a.dnnl_memory_desc_get_size(sp))}, at::TensorOptions().dtype(at::kByte));
        args.push_back({DNNL_ARG_SCRATCHPAD, sp, scratch.data_ptr()});
    }
    thread_local dnnl_stream_t stream = [] {
        dnnl_stream_t s = nullptr;
        DNNL_CHECK(need_api().dnnl_stream_create(&s, need_api().engine, dnnl_stream_default_flags), "stream");
        return s;
    }();
    std::vector<dnnl_memory_t> mems;
    std::vector<dnnl_exec_arg_t> ea;
    struct Guard {
        std::vector<dnnl_memory_t> &m;
        ~Guard() {
            for (auto x : m) api().dnnl_memory_destroy(x);
        }
    } guard{mems};
    for (const Arg &g : args) {
        dnnl_memory_t m = nullptr;
        DNNL_CHECK(a.dnnl_memory_create(&m, g.md, a.engine, g.ptr), "memory object");
        mems.push_back(m);
        ea.push_back({g.arg, m});
    }
    DNNL_CHECK(a.dnnl_primitive_execute(p.p, stream, int(ea.size()), ea.data()), what);
    DNNL_CHECK(a.dnnl_stream_wait(stream), what);
}

std::unique_ptr<Prim> reorder(const_dnnl_memory_desc_t from, const_dnnl_memory_desc_t to) {
    const Api &a = need_api();
    auto r = std::make_unique<Prim>();
    DNNL_CHECK(a.dnnl_reorder_primitive_desc_create(&r->pd, from, a.engine, to, a.engine, user_scratchpad_attr()),
               "reorder descriptor");
    r->create("reorder");
    return r;
}

bool same(const_dnnl_memory_desc_t x, const_dnnl_memory_desc_t y) { return need_api().dnnl_memory_desc_equal(x, y) != 0; }

// ---------------------------------------------------------------------------------------
// Convolutions and transposed convolutions: primitives per shape, created once.

struct ConvKey {
    bool deconv, plain_src, bias;
    int64_t n, c, o, h, w, k, stride, pad;
    bool operator<(const ConvKey &x) const {
        return std::tie(deconv, plain_src, bias, n, c, o, h, w, k, stride, pad) <
               std::tie(x.deconv, x.plain_src, x.bias, x.n, x.c, x.o, x.h, x.w, x.k, x.stride, x.pad);
    }
};

struct ConvPrims {
    int64_t oh = 0, ow = 0;
    Md src, dst, wplain, bias;  // the tensors' own layouts
    Prim fwd, bwd_data, bwd_w;
    std::unique_ptr<Prim> w_to_fwd, w_to_bwd, dw_to_plain;  // null where no reorder is needed
};

ConvPrims &conv_prims(const ConvKey &key) {
    static std::mutex mu;
    // never destroyed: its primitives must not be released at exit after the oneDNN
    // library's own statics (nor under a thread still running); one entry per layer shape
    static auto *cache = new std::map<ConvKey, std::unique_ptr<ConvPrims>>();
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache->find(key);
    if (it != cache->end()) return *it->second;
    const Api &a = need_api();
    auto cp = std::make_unique<ConvPrims>();
    const int64_t k = key.k, s = key.stride, p = key.pad;
    if (key.deconv) {
        cp->oh = (key.h - 1) * s - 2 * p + k;
        cp->ow = (key.w - 1) * s - 2 * p + k;
    } else {
        cp->oh = (key.h + 2 * p - k) / s + 1;
        cp->ow = (key.w + 2 * p - k) / s + 1;
    }
    TORCH_CHECK(cp->oh > 0 && cp->ow > 0, "convolution output would be empty");
    dnnl_dims_t sd{key.n, key.c, key.h, key.w};
    dnnl_dims_t dd{key.n, key.o, cp->oh, cp->ow};
    dnnl_dims_t wd{key.o, key.c, k, k};
    dnnl_dims_t bd{key.o};
    DNNL_CHECK(a.dnnl_memory_desc_create_with_tag(&cp->src.md, 4, sd, dnnl_f32, key.plain_src ? dnnl_abcd : dnnl_aBcd16b),
               "source descriptor");
    DNNL_CHECK(a.dnnl_memory_desc_create_with_tag(&cp->dst.md, 4, dd, dnnl_f32, dnnl_aBcd16b), "destination descriptor");
    // torch's weights: conv (O, C, k, k); transposed conv (C, O, k, k), which is oneDNN's
    // deconvolution weights {O, C, k, k} in the iohw order
    DNNL_CHECK(a.dnnl_memory_desc_create_with_tag(&cp->wplain.md, 4, wd, dnnl_f32, key.deconv ? dnnl_iohw : dnnl_oihw),
               "weights descriptor");
    DNNL_CHECK(a.dnnl_memory_desc_create_with_tag(&cp->bias.md, 1, bd, dnnl_f32, dnnl_a), "bias descriptor");
    Md wany({key.o, key.c, k, k}, dnnl_format_tag_any);
    dnnl_dims_t strides{s, s}, dil{0, 0}, pads{p, p};
    const_dnnl_memory_desc_t bmd = key.bias ? cp->bias.md : nullptr;
    // oneDNN 3.2 adds a transposed convolution's bias with a slow reference loop: the
    // forward primitive runs without it and add_bias() adds it (the weight-gradient
    // primitive still computes the bias gradient)
    const_dnnl_memory_desc_t fwd_bmd = key.deconv ? nullptr : bmd;
    const dnnl_alg_kind_t alg = key.deconv ? dnnl_deconvolution_direct : dnnl_convolution_direct;
    auto attr = user_scratchpad_attr();
    if (key.deconv) {
        DNNL_CHECK(a.dnnl_deconvolution_forward_primitive_desc_create(&cp->fwd.pd, a.engine, dnnl_forward_training, alg,
                                                                      cp->src.md, wany.md, fwd_bmd, cp->dst.md, strides,
                                                                      dil, pads, pads, attr),
                   "transposed convolution forward descriptor");
        DNNL_CHECK(a.dnnl_deconvolution_backward_data_primitive_desc_create(&cp->bwd_data.pd, a.engine, alg, cp->src.md,
                                                                            wany.md, cp->dst.md, strides, dil, pads,
                                                                            pads, cp->fwd.pd, attr),
                   "transposed convolution backward-data descriptor");
        DNNL_CHECK(a.dnnl_deconvolution_backward_weights_primitive_desc_create(
                       &cp->bwd_w.pd, a.engine, alg, cp->src.md, wany.md, bmd, cp->dst.md, strides, dil, pads, pads,
                       cp->fwd.pd, attr),
                   "transposed convolution backward-weights descriptor");
    } else {
        DNNL_CHECK(a.dnnl_convolution_forward_primitive_desc_create(&cp->fwd.pd, a.engine, dnnl_forward_training, alg,
                                                                    cp->src.md, wany.md, bmd, cp->dst.md, strides, dil,
                                                                    pads, pads, attr),
                   "convolution forward descriptor");
        // a first layer's plain input needs no gradient (and may have no backward-data
        // kernel): a missing one is an error only if a gradient is asked for
        dnnl_status_t st = a.dnnl_convolution_backward_data_primitive_desc_create(
            &cp->bwd_data.pd, a.engine, alg, cp->src.md, wany.md, cp->dst.md, strides, dil, pads, pads, cp->fwd.pd, attr);
        TORCH_CHECK(st == dnnl_success || key.plain_src, "oneDNN: convolution backward-data descriptor failed (status ",
                    int(st), ")");
        if (st != dnnl_success) cp->bwd_data.pd = nullptr;
        DNNL_CHECK(a.dnnl_convolution_backward_weights_primitive_desc_create(&cp->bwd_w.pd, a.engine, alg, cp->src.md,
                                                                             wany.md, bmd, cp->dst.md, strides, dil,
                                                                             pads, pads, cp->fwd.pd, attr),
                   "convolution backward-weights descriptor");
    }
    cp->fwd.create("forward");
    if (cp->bwd_data.pd) cp->bwd_data.create("backward data");
    cp->bwd_w.create("backward weights");
    // the primitives must use the activations' layouts as given (no hidden reorder)
    TORCH_CHECK(same(cp->fwd.md(dnnl_query_src_md), cp->src.md) && same(cp->fwd.md(dnnl_query_dst_md), cp->dst.md),
                "oneDNN chose other activation layouts than requested");
    const_dnnl_memory_desc_t wf = cp->fwd.md(dnnl_query_weights_md);
    const_dnnl_memory_desc_t dw = cp->bwd_w.md(dnnl_query_diff_weights_md);
    if (!same(wf, cp->wplain.md)) cp->w_to_fwd = reorder(cp->wplain.md, wf);
    if (cp->bwd_data.pd) {
        const_dnnl_memory_desc_t wb = cp->bwd_data.md(dnnl_query_weights_md);
        if (!same(wb, cp->wplain.md)) cp->w_to_bwd = reorder(cp->wplain.md, wb);
    }
    if (!same(dw, cp->wplain.md)) cp->dw_to_plain = reorder(dw, cp->wplain.md);
    if (std::getenv("LUMOS_ONEDNN_VERBOSE"))
        std::fprintf(stderr, "lumos onednn %s n%ld c%ld o%ld %ldx%ld k%ld s%ld: fwd %s, bwd data %s, bwd weights %s\n",
                     key.deconv ? "deconv" : "conv", long(key.n), long(key.c), long(key.o), long(key.h), long(key.w),
                     long(k), long(s), cp->fwd.impl().c_str(), cp->bwd_data.pd ? cp->bwd_data.impl().c_str() : "none",
                     cp->bwd_w.impl().c_str());
    auto &ref = *cp;
    cache->emplace(key, std::move(cp));
    return ref;
}

// The weights in the layout `to` wants (a new buffer), or the plain tensor itself.
at::Tensor weights_for(const at::Tensor &w, const std::unique_ptr<Prim> &to, const ConvPrims &cp, dnnl_query_t q,
                       const Prim &user) {
    if (!to) return w;
    const_dnnl_memory_desc_t md = user.md(q);
    auto buf = at::empty({int64_t(need_api().dnnl_memory_desc_get_size(md) / sizeof(float))}, w.options());
    execute(*to, {{DNNL_ARG_FROM, cp.wplain.md, w.data_ptr()}, {DNNL_ARG_TO, md, buf.data_ptr()}}, "weights reorder");
    return buf;
}

// y[n, c, p] += b[c] over a blocked (N, C/16, H, W, 16) tensor.
void add_bias(at::Tensor &y, const at::Tensor &b) {
    const int64_t m = y.size(0) * y.size(1), cb = y.size(1), hw = y.size(2) * y.size(3);
    float *yp = y.data_ptr<float>();
    const float *bp = b.data_ptr<float>();
    at::parallel_for(0, m, 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
            float *__restrict row = yp + i * hw * 16;
            const float *__restrict bb = bp + (i % cb) * 16;
            for (int64_t p = 0; p < hw; ++p)
                for (int64_t c = 0; c < 16; ++c) row[p * 16 + c] += bb[c];
        }
    });
}

// x: (N, C/16, H, W, 16) blocked, or (N, C, H, W) plain for a first layer; w: torch's
// weights; b: the bias or an empty tensor.
struct BlockedConv : public torch::autograd::Function<BlockedConv> {
    static at::Tensor forward(AutogradContext *ctx, const at::Tensor &x_in, const at::Tensor &w_in,
                              const at::Tensor &b_in, bool deconv, int64_t stride, int64_t pad) {
        const at::Tensor x = x_in.contiguous(), w = w_in.contiguous(), b = b_in.contiguous();
        const bool plain = x.dim() == 4;
        const int64_t n = x.size(0), c = plain ? x.size(1) : x.size(1) * 16;
        const int64_t h = x.size(2), wd = x.size(3);
        const int64_t o = deconv ? w.size(1) : w.size(0), k = w.size(2);
        ConvKey key{deconv, plain, b.numel() > 0, n, c, o, h, wd, k, stride, pad};
        ConvPrims &cp = conv_prims(key);
        auto y = at::empty({n, o / 16, cp.oh, cp.ow, 16}, x.options());
        at::Tensor wf = weights_for(w, cp.w_to_fwd, cp, dnnl_query_weights_md, cp.fwd);
        std::vector<Arg> args{{DNNL_ARG_SRC, cp.src.md, x.data_ptr()},
                              {DNNL_ARG_WEIGHTS, cp.fwd.md(dnnl_query_weights_md), wf.data_ptr()},
                              {DNNL_ARG_DST, cp.dst.md, y.data_ptr()}};
        if (key.bias && !deconv) args.push_back({DNNL_ARG_BIAS, cp.bias.md, b.data_ptr()});
        execute(cp.fwd, args, "forward");
        if (key.bias && deconv) add_bias(y, b);
        ctx->save_for_backward({x, w});
        ctx->saved_data["deconv"] = deconv;
        ctx->saved_data["plain"] = plain;
        ctx->saved_data["bias"] = key.bias;
        ctx->saved_data["stride"] = stride;
        ctx->saved_data["pad"] = pad;
        return y;
    }

    static variable_list backward(AutogradContext *ctx, variable_list grads) {
        auto saved = ctx->get_saved_variables();
        const at::Tensor x = saved[0], w = saved[1];
        const bool deconv = ctx->saved_data["deconv"].toBool(), plain = ctx->saved_data["plain"].toBool();
        const bool has_bias = ctx->saved_data["bias"].toBool();
        const int64_t stride = ctx->saved_data["stride"].toInt(), pad = ctx->saved_data["pad"].toInt();
        at::Tensor gx, gw, gb;
        if (!grads[0].defined()) return {gx, gw, gb, at::Tensor(), at::Tensor(), at::Tensor()};
        const at::Tensor gy = grads[0].contiguous();
        const int64_t n = x.size(0), c = plain ? x.size(1) : x.size(1) * 16;
        const int64_t o = deconv ? w.size(1) : w.size(0), k = w.size(2);
        ConvKey key{deconv, plain, has_bias, n, c, o, x.size(2), x.size(3), k, stride, pad};
        ConvPrims &cp = conv_prims(key);
        if (ctx->needs_input_grad(0)) {
            TORCH_CHECK(cp.bwd_data.p, "oneDNN has no backward-data convolution for a plain ", c, "-channel input");
            at::Tensor wb = weights_for(w, cp.w_to_bwd, cp, dnnl_query_weights_md, cp.bwd_data);
            gx = at::empty_like(x);
            execute(cp.bwd_data,
                    {{DNNL_ARG_DIFF_DST, cp.dst.md, gy.data_ptr()},
                     {DNNL_ARG_WEIGHTS, cp.bwd_data.md(dnnl_query_weights_md), wb.data_ptr()},
                     {DNNL_ARG_DIFF_SRC, cp.src.md, gx.data_ptr()}},
                    "backward data");
        }
        if (ctx->needs_input_grad(1) || (has_bias && ctx->needs_input_grad(2))) {
            const_dnnl_memory_desc_t dwmd = cp.bwd_w.md(dnnl_query_diff_weights_md);
            gw = at::empty_like(w);
            at::Tensor dwbuf = cp.dw_to_plain
                                   ? at::empty({int64_t(need_api().dnnl_memory_desc_get_size(dwmd) / sizeof(float))},
                                               w.options())
                                   : gw;
            std::vector<Arg> args{{DNNL_ARG_SRC, cp.src.md, x.data_ptr()},
                                  {DNNL_ARG_DIFF_DST, cp.dst.md, gy.data_ptr()},
                                  {DNNL_ARG_DIFF_WEIGHTS, dwmd, dwbuf.data_ptr()}};
            if (has_bias) {
                gb = at::empty({o}, w.options());
                args.push_back({DNNL_ARG_DIFF_BIAS, cp.bias.md, gb.data_ptr()});
            }
            execute(cp.bwd_w, args, "backward weights");
            if (cp.dw_to_plain)
                execute(*cp.dw_to_plain, {{DNNL_ARG_FROM, dwmd, dwbuf.data_ptr()}, {DNNL_ARG_TO, cp.wplain.md, gw.data_ptr()}},
                        "weight-gradient reorder");
        }
        return {gx, gw, gb, at::Tensor(), at::Tensor(), at::Tensor()};
    }
};

// ---------------------------------------------------------------------------------------
// InstanceNorm (per sample and channel, biased variance, affine) + LeakyReLU on blocked
// activations. A (N, C/16, H, W, 16) tensor is N * C/16 "images" of H * W pixels of 16
// channels each, contiguous: the kernels below loop over the 16 channels of a pixel
// (vectorized) and over the pixels in fixed chunks; each chunk's partial results are merged
// in chunk order in double precision, so the result does not depend on the thread count.

constexpr int64_t L = 16;
constexpr int64_t CHUNK = 256;

struct Dims {
    int64_t m, cb, hw, chunks;  // m = N * cb blocks of hw pixels x 16 channels
};

Dims dims_of(const at::Tensor &x) {
    Dims d;
    d.cb = x.size(1);
    d.m = x.size(0) * d.cb;
    d.hw = x.size(2) * x.size(3);
    d.chunks = (d.hw + CHUNK - 1) / CHUNK;
    return d;
}

LUMOS_CLONES
void chunk_moments(const float *__restrict x, int64_t rows, float *__restrict s, float *__restrict q) {
    for (int64_t c = 0; c < L; ++c) s[c] = q[c] = 0.f;
    for (int64_t p = 0; p < rows; ++p)
        for (int64_t c = 0; c < L; ++c) s[c] += x[p * L + c];
    const float inv = 1.f / float(rows);
    for (int64_t c = 0; c < L; ++c) s[c] *= inv;
    for (int64_t p = 0; p < rows; ++p)
        for (int64_t c = 0; c < L; ++c) {
            const float dv = x[p * L + c] - s[c];
            q[c] += dv * dv;
        }
}

LUMOS_CLONES
void act_rows(const float *__restrict x, int64_t rows, const float *__restrict a, const float *__restrict shift,
              float slope, float *__restrict y) {
    for (int64_t p = 0; p < rows; ++p)
        for (int64_t c = 0; c < L; ++c) {
            const float z = x[p * L + c] * a[c] + shift[c];
            y[p * L + c] = std::max(z, 0.f) + slope * std::min(z, 0.f);
        }
}

LUMOS_CLONES
void grad_sums(const float *__restrict x, const float *__restrict gy, int64_t rows, const float *__restrict a,
               const float *__restrict shift, const float *__restrict mean, float slope, float *__restrict sg,
               float *__restrict sgx) {
    for (int64_t c = 0; c < L; ++c) sg[c] = sgx[c] = 0.f;
    for (int64_t p = 0; p < rows; ++p)
        for (int64_t c = 0; c < L; ++c) {
            const float z = x[p * L + c] * a[c] + shift[c];
            const float g = gy[p * L + c] * (z > 0.f ? 1.f : slope);
            sg[c] += g;
            sgx[c] += g * (x[p * L + c] - mean[c]);
        }
}

LUMOS_CLONES
void grad_input(const float *__restrict x, const float *__restrict gy, int64_t rows, const float *__restrict a,
                const float *__restrict shift, const float *__restrict bx, const float *__restrict cx, float slope,
                float *__restrict out) {
    for (int64_t p = 0; p < rows; ++p)
        for (int64_t c = 0; c < L; ++c) {
            const float z = x[p * L + c] * a[c] + shift[c];
            const float g = gy[p * L + c] * (z > 0.f ? 1.f : slope);
            out[p * L + c] = a[c] * g + bx[c] * x[p * L + c] + cx[c];
        }
}

template <class F>
void for_chunks(const Dims &d, F f) {
    at::parallel_for(0, d.m * d.chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
            const int64_t m = task / d.chunks, k = task % d.chunks;
            const int64_t p0 = k * CHUNK, p1 = std::min(d.hw, p0 + CHUNK);
            f(task, m, (m * d.hw + p0) * L, p1 - p0);
        }
    });
}

// Normalization groups: instance norm normalizes each block m = (n, cb) on its own; batch
// norm (training) pools the N blocks of a channel block. `members(g)` lists the blocks of
// group g in sample order.
struct Groups {
    bool batch;
    int64_t n, cb;
    int64_t count() const { return batch ? cb : n * cb; }
    int64_t size() const { return batch ? n : 1; }
    int64_t member(int64_t g, int64_t i) const { return batch ? i * cb + g : g; }
};

struct BlockedNormAct : public torch::autograd::Function<BlockedNormAct> {
    // rm / rv: BatchNorm's running statistics (updated in place, batch mode only) or
    // empty tensors
    static at::Tensor forward(AutogradContext *ctx, const at::Tensor &x_in, const at::Tensor &w_in,
                              const at::Tensor &b_in, at::Tensor rm, at::Tensor rv, bool batch, double momentum,
                              double eps, double slope) {
        const at::Tensor x = x_in.contiguous(), w = w_in.contiguous(), b = b_in.contiguous();
        const Dims d = dims_of(x);
        const Groups gr{batch, x.size(0), d.cb};
        const float *xp = x.data_ptr<float>();
        std::vector<double> cmean(d.m * d.chunks * L), cm2(d.m * d.chunks * L);
        for_chunks(d, [&](int64_t task, int64_t, int64_t off, int64_t rows) {
            float s[L], q[L];
            chunk_moments(xp + off, rows, s, q);
            for (int64_t c = 0; c < L; ++c) {
                cmean[task * L + c] = s[c];
                cm2[task * L + c] = q[c];
            }
        });
        // per block and channel: mean, rstd of its group (Chan et al.'s pairwise merge of
        // the chunks of the group's blocks, in order)
        auto stats = at::empty({2, d.m, L}, x.options().memory_format(at::MemoryFormat::Contiguous));
        float *mean = stats.data_ptr<float>(), *rstd = mean + d.m * L;
        for (int64_t g = 0; g < gr.count(); ++g)
            for (int64_t c = 0; c < L; ++c) {
                double count = 0, mu = 0, m2 = 0;
                for (int64_t i = 0; i < gr.size(); ++i) {
                    const int64_t m = gr.member(g, i);
                    for (int64_t k = 0; k < d.chunks; ++k) {
                        const double cnt = double(std::min(d.hw, (k + 1) * CHUNK) - k * CHUNK);
                        const double km = cmean[(m * d.chunks + k) * L + c], kq = cm2[(m * d.chunks + k) * L + c];
                        const double tot = count + cnt, delta = km - mu;
                        mu += delta * cnt / tot;
                        m2 += kq + delta * delta * count * cnt / tot;
                        count = tot;
                    }
                }
                for (int64_t i = 0; i < gr.size(); ++i) {
                    const int64_t m = gr.member(g, i);
                    mean[m * L + c] = float(mu);
                    rstd[m * L + c] = float(1.0 / std::sqrt(m2 / count + eps));
                }
                if (batch && rm.defined() && rm.numel() > 0) {
                    // as libtorch's batch_norm: the running variance takes the unbiased variance
                    const int64_t ch = g * L + c;
                    float *rmp = rm.data_ptr<float>(), *rvp = rv.data_ptr<float>();
                    rmp[ch] = float((1.0 - momentum) * double(rmp[ch]) + momentum * mu);
                    rvp[ch] = float((1.0 - momentum) * double(rvp[ch]) + momentum * (m2 / std::max(count - 1.0, 1.0)));
                }
            }
        std::vector<float> a(d.m * L), sh(d.m * L);
        const float *wp = w.data_ptr<float>(), *bp = b.data_ptr<float>();
        for (int64_t m = 0; m < d.m; ++m)
            for (int64_t c = 0; c < L; ++c) {
                const int64_t ch = (m % d.cb) * L + c, i = m * L + c;
                a[i] = rstd[i] * wp[ch];
                sh[i] = bp[ch] - mean[i] * a[i];
            }
        auto y = at::empty_like(x);
        float *yp = y.data_ptr<float>();
        const float sl = float(slope);
        for_chunks(d, [&](int64_t, int64_t m, int64_t off, int64_t rows) {
            act_rows(xp + off, rows, a.data() + m * L, sh.data() + m * L, sl, yp + off);
        });
        ctx->save_for_backward({x, w, b, stats});
        ctx->saved_data["slope"] = slope;
        ctx->saved_data["batch"] = batch;
        return y;
    }

    static variable_list backward(AutogradContext *ctx, variable_list grads) {
        const int nin = 9;
        if (!grads[0].defined()) return variable_list(nin);
        auto saved = ctx->get_saved_variables();
        const at::Tensor x = saved[0], w = saved[1], b = saved[2], stats = saved[3];
        const float slope = float(ctx->saved_data["slope"].toDouble());
        const bool batch = ctx->saved_data["batch"].toBool();
        const at::Tensor gy = grads[0].contiguous();
        const Dims d = dims_of(x);
        const Groups gr{batch, x.size(0), d.cb};
        const float *xp = x.data_ptr<float>(), *gp = gy.data_ptr<float>();
        const float *mean = stats.data_ptr<float>(), *rstd = mean + d.m * L;
        const float *wp = w.data_ptr<float>(), *bp = b.data_ptr<float>();
        std::vector<float> a(d.m * L), sh(d.m * L);
        for (int64_t m = 0; m < d.m; ++m)
            for (int64_t c = 0; c < L; ++c) {
                const int64_t ch = (m % d.cb) * L + c, i = m * L + c;
                a[i] = rstd[i] * wp[ch];
                sh[i] = bp[ch] - mean[i] * a[i];
            }
        std::vector<float> cg(d.m * d.chunks * L), cgx(d.m * d.chunks * L);
        for_chunks(d, [&](int64_t task, int64_t m, int64_t off, int64_t rows) {
            grad_sums(xp + off, gp + off, rows, a.data() + m * L, sh.data() + m * L, mean + m * L, slope,
                      cg.data() + task * L, cgx.data() + task * L);
        });
        // per block: the sums of g and g * (x - mean) over its group, merged in order (double)
        std::vector<double> sum_g(d.m * L, 0.0), sum_gx(d.m * L, 0.0);
        for (int64_t g = 0; g < gr.count(); ++g)
            for (int64_t c = 0; c < L; ++c) {
                double sg = 0, sgx = 0;
                for (int64_t i = 0; i < gr.size(); ++i) {
                    const int64_t m = gr.member(g, i);
                    for (int64_t k = 0; k < d.chunks; ++k) {
                        sg += cg[(m * d.chunks + k) * L + c];
                        sgx += cgx[(m * d.chunks + k) * L + c];
                    }
                }
                for (int64_t i = 0; i < gr.size(); ++i) {
                    const int64_t m = gr.member(g, i);
                    sum_g[m * L + c] = sg;
                    sum_gx[m * L + c] = sgx;
                }
            }
        variable_list out(nin);
        if (ctx->needs_input_grad(1) || ctx->needs_input_grad(2)) {
            const int64_t C = d.cb * L, n = d.m / d.cb;
            at::Tensor gw = at::empty({C}, w.options()), gb = at::empty({C}, b.options());
            float *gwp = gw.data_ptr<float>(), *gbp = gb.data_ptr<float>();
            for (int64_t ch = 0; ch < C; ++ch) {
                double sw = 0, sb = 0;
                // a group's sums are stored with each of its members: count them once
                for (int64_t s = 0; s < (batch ? 1 : n); ++s) {
                    const int64_t i = (s * d.cb + ch / L) * L + ch % L;
                    sw += sum_gx[i] * rstd[i];
                    sb += sum_g[i];
                }
                gwp[ch] = float(sw);
                gbp[ch] = float(sb);
            }
            out[1] = gw;
            out[2] = gb;
        }
        if (ctx->needs_input_grad(0)) {
            // dx = a * (g - mean(g) - xhat * mean(g * xhat)) = a * g + bx * x + cx, the means
            // over the group
            const double cnt = double(d.hw * gr.size());
            std::vector<float> bx(d.m * L), cx(d.m * L);
            for (int64_t i = 0; i < d.m * L; ++i) {
                const double r = rstd[i], mg = sum_g[i] / cnt, mgx = sum_gx[i] * r / cnt;
                bx[i] = float(-double(a[i]) * r * mgx);
                cx[i] = float(double(a[i]) * (r * mgx * mean[i] - mg));
            }
            at::Tensor gx = at::empty_like(x);
            float *gxp = gx.data_ptr<float>();
            for_chunks(d, [&](int64_t, int64_t m, int64_t off, int64_t rows) {
                grad_input(xp + off, gp + off, rows, a.data() + m * L, sh.data() + m * L, bx.data() + m * L,
                           cx.data() + m * L, slope, gxp + off);
            });
            out[0] = gx;
        }
        return out;
    }
};

void fail(char *err, size_t err_len, const char *msg) {
    if (err && err_len) std::snprintf(err, err_len, "%s", msg);
}

// Runs `f` for an entry point: 0 on success, else 1 with the message (without libtorch's
// C++ backtrace) in `err`.
template <class F>
int guarded(char *err, size_t err_len, F f) {
    try {
        f();
        return 0;
    } catch (const c10::Error &e) {
        fail(err, err_len, e.what_without_backtrace());
    } catch (const std::exception &e) {
        fail(err, err_len, e.what());
    } catch (...) {
        fail(err, err_len, "unknown C++ exception");
    }
    return 1;
}

void check_f32_cpu(const at::Tensor &t, const char *name) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, ": expected a float32 CPU tensor, got ",
                t.scalar_type(), " on ", t.device());
}

}  // namespace

extern "C" {

// Whether oneDNN could be loaded; on failure the reason goes to `err`. On success `err`
// holds the loaded oneDNN's version.
int lumos_onednn_available(const char *library, char *err, size_t err_len) {
    bool ok = false;
    const int rc = guarded(err, err_len, [&] {
        if (library && *library) g_library = library;
        const Api &a = api();
        ok = a.error.empty();
        fail(err, err_len, ok ? a.version.c_str() : a.error.c_str());
    });
    return rc == 0 && ok;
}

// A convolution (deconv == 0; torch weights (O, C, k, k), padding `pad`) or transposed
// convolution (deconv == 1; torch weights (C, O, k, k)) with stride `stride`, of a
// blocked float32 CPU input (N, C/16, H, W, 16), or of a plain (N, C, H, W) one; `b` is the
// bias (O,) or an empty tensor. The result is blocked, (N, O/16, H', W', 16); O must be a
// multiple of 16. Differentiable in x, w and b.
int lumos_onednn_conv(at::Tensor *x, at::Tensor *w, at::Tensor *b, int deconv, int64_t stride, int64_t pad,
                      at::Tensor **out, char *err, size_t err_len) {
    return guarded(err, err_len, [&] {
        need_api();
        check_f32_cpu(*x, "input");
        check_f32_cpu(*w, "weights");
        TORCH_CHECK(w->dim() == 4 && w->size(2) == w->size(3), "expected 4-d square-kernel weights, got ", w->sizes());
        TORCH_CHECK(x->dim() == 4 || (x->dim() == 5 && x->size(4) == 16),
                    "expected an (N, C, H, W) or blocked (N, C/16, H, W, 16) input, got ", x->sizes());
        const int64_t c = x->dim() == 4 ? x->size(1) : x->size(1) * 16;
        const int64_t wc = deconv ? w->size(0) : w->size(1), o = deconv ? w->size(1) : w->size(0);
        TORCH_CHECK(wc == c, "weights ", w->sizes(), " do not match an input of ", c, " channels");
        TORCH_CHECK(o % 16 == 0, "output channels must be a multiple of 16, got ", o);
        TORCH_CHECK(b->numel() == 0 || (b->dim() == 1 && b->size(0) == o), "expected a bias of shape (", o,
                    ") or none, got ", b->sizes());
        if (b->numel() > 0) check_f32_cpu(*b, "bias");
        TORCH_CHECK(stride >= 1 && pad >= 0, "stride must be >= 1 and padding >= 0");
        *out = new at::Tensor(BlockedConv::apply(*x, *w, *b, deconv != 0, stride, pad));
    });
}

// leaky_relu(instance_norm(x), slope) of a blocked float32 CPU tensor (N, C/16, H, W, 16)
// with per-channel affine w, b of shape (C,); the result is blocked. Needs no oneDNN.
int lumos_blocked_norm_act(at::Tensor *x, at::Tensor *w, at::Tensor *b, double eps, double slope, at::Tensor **out,
                           char *err, size_t err_len) {
    return guarded(err, err_len, [&] {
        check_f32_cpu(*x, "input");
        check_f32_cpu(*w, "weight");
        check_f32_cpu(*b, "bias");
        TORCH_CHECK(x->dim() == 5 && x->size(4) == 16, "expected a blocked (N, C/16, H, W, 16) input, got ",
                    x->sizes());
        const int64_t c = x->size(1) * 16;
        TORCH_CHECK(w->dim() == 1 && b->dim() == 1 && w->size(0) == c && b->size(0) == c,
                    "expected weight and bias of shape (", c, "), got ", w->sizes(), " and ", b->sizes());
        TORCH_CHECK(x->size(2) * x->size(3) > 0, "expected a non-empty image, got ", x->sizes());
        const at::Tensor none = at::empty({0}, x->options());
        *out = new at::Tensor(BlockedNormAct::apply(*x, *w, *b, none, none, false, 0.0, eps, slope));
    });
}

// Training-mode BatchNorm (batch statistics over N, H, W; affine w, b of shape (C,);
// running_mean / running_var of shape (C,) updated in place with `momentum`, the running
// variance unbiased, as libtorch's batch_norm) + LeakyReLU(slope) of a blocked float32 CPU
// tensor; the result is blocked. Needs no oneDNN.
int lumos_blocked_batch_norm_act(at::Tensor *x, at::Tensor *w, at::Tensor *b, at::Tensor *running_mean,
                                 at::Tensor *running_var, double momentum, double eps, double slope, at::Tensor **out,
                                 char *err, size_t err_len) {
    return guarded(err, err_len, [&] {
        check_f32_cpu(*x, "input");
        TORCH_CHECK(x->dim() == 5 && x->size(4) == 16, "expected a blocked (N, C/16, H, W, 16) input, got ",
                    x->sizes());
        const int64_t c = x->size(1) * 16;
        for (at::Tensor *t : {w, b, running_mean, running_var}) {
            check_f32_cpu(*t, "batch norm parameter");
            TORCH_CHECK(t->dim() == 1 && t->size(0) == c && t->is_contiguous(),
                        "expected contiguous batch norm parameters of shape (", c, "), got ", t->sizes());
        }
        TORCH_CHECK(x->size(0) * x->size(2) * x->size(3) > 1, "batch norm needs more than one value per channel, got ",
                    x->sizes());
        *out = new at::Tensor(
            BlockedNormAct::apply(*x, *w, *b, *running_mean, *running_var, true, momentum, eps, slope));
    });
}

}  // extern "C"
