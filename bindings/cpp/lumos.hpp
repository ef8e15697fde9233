// Header-only C++17 wrapper of the lumos C API (include/lumos.h): RAII handles and
// exceptions. It re-implements nothing; every call goes to liblumos.
//
//   lumos::Model model("model.lumos");
//   std::vector<uint8_t> labels = model.segment(image);   // image: lumos::Image (C, H, W)
//
// Thread safety follows the C API: a Model may be shared between threads (calls are
// serialized by the library); CancelToken::cancel may be called from any thread.
#pragma once

#include <cstdint>
#include <cstddef>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "lumos.h"

namespace lumos {

/// A failed call: the C status and the library's message.
class Error : public std::runtime_error {
public:
    Error(LumosStatus status, const std::string &what)
        : std::runtime_error(std::string(lumos_status_name(status)) + ": " + what + ": " + lumos_last_error_message()),
          status_(status) {}
    LumosStatus status() const { return status_; }
    bool cancelled() const { return status_ == LUMOS_STATUS_CANCELLED; }

private:
    LumosStatus status_;
};

inline void check(LumosStatus s, const char *what) {
    if (s != LUMOS_STATUS_OK) throw Error(s, what);
}

/// A (C, H, W) float image owned by C++ (data channel-major, row-major within a channel).
struct Image {
    std::vector<float> data;
    size_t channels = 0, height = 0, width = 0;
};

namespace detail {
/// Frees a library-owned LumosImage when it goes out of scope, also when an exception
/// (std::bad_alloc while copying) leaves the scope first.
struct ImageGuard {
    LumosImage &im;
    ~ImageGuard() { lumos_image_free(&im); }
};

/// Moves a library-owned LumosImage into an Image and frees the library's copy.
inline Image take(LumosImage &im) {
    ImageGuard guard{im};
    Image out;
    out.channels = im.channels;
    out.height = im.height;
    out.width = im.width;
    out.data.assign(im.data, im.data + im.channels * im.height * im.width);
    return out;
}

/// The library reads C * H * W floats from the image's data without a length: an Image
/// whose vector is shorter would be read past its end.
inline void check_size(const Image &x, size_t channels, const char *what) {
    size_t n = channels;
    for (size_t d : {x.height, x.width}) {
        if (d != 0 && n > SIZE_MAX / d) throw std::invalid_argument(std::string(what) + ": image size overflows");
        n *= d;
    }
    if (x.data.size() != n)
        throw std::invalid_argument(std::string(what) + ": the image holds " + std::to_string(x.data.size()) +
                                    " floats; channels * height * width = " + std::to_string(n));
}
}  // namespace detail

inline Image read_tiff(const std::string &path) {
    LumosImage im{};
    check(lumos_image_read_tiff(path.c_str(), &im), "reading a TIFF");
    return detail::take(im);
}

/// One simulated frame and its truth (see lumos_simulate).
inline std::pair<Image, Image> simulate(const std::string &modality, const std::string &config_json, uint64_t seed) {
    LumosImage im{}, tr{};
    check(lumos_simulate(modality.c_str(), config_json.c_str(), seed, &im, &tr), "simulating a frame");
    detail::ImageGuard truth_guard{tr};  // freed even if copying the image throws
    Image image = detail::take(im);
    return {std::move(image), detail::take(tr)};
}

class CancelToken {
public:
    CancelToken() { check(lumos_cancel_token_new(&t_), "creating a cancel token"); }
    ~CancelToken() { lumos_cancel_token_free(t_); }
    CancelToken(const CancelToken &) = delete;
    CancelToken &operator=(const CancelToken &) = delete;
    void cancel() const { check(lumos_cancel_token_cancel(t_), "cancelling"); }
    void reset() const { check(lumos_cancel_token_reset(t_), "resetting a cancel token"); }
    const LumosCancelToken *get() const { return t_; }

private:
    LumosCancelToken *t_ = nullptr;
};

class Model {
public:
    explicit Model(const std::string &path, const std::string &device = "auto") {
        check(lumos_model_load(path.c_str(), device.c_str(), &m_), "loading a model");
        try {
            check(lumos_model_info(m_, &info_), "model info");
        } catch (...) {
            lumos_model_free(m_);
            throw;
        }
    }
    ~Model() { lumos_model_free(m_); }
    Model(const Model &) = delete;
    Model &operator=(const Model &) = delete;
    Model(Model &&o) noexcept : m_(std::exchange(o.m_, nullptr)), info_(o.info_) {}
    Model &operator=(Model &&o) noexcept {
        if (this != &o) {
            lumos_model_free(m_);
            m_ = std::exchange(o.m_, nullptr);
            info_ = o.info_;
        }
        return *this;
    }

    const LumosModelInfo &info() const { return info_; }
    std::string kind() const {
        const char *s = nullptr;
        check(lumos_model_kind_name(m_, &s), "model kind");
        return s;
    }
    std::string class_name(size_t i) const {
        const char *s = nullptr;
        check(lumos_model_class_name(m_, i, &s), "class name");
        return s;
    }
    void save(const std::string &path) const { check(lumos_model_save(m_, path.c_str()), "saving a model"); }
    /// Inference arithmetic: LUMOS_PRECISION_FLOAT32 (default) or LUMOS_PRECISION_BFLOAT16.
    void set_precision(uint32_t precision) const {
        check(lumos_model_set_precision(m_, precision), "setting the inference precision");
    }
    uint32_t precision() const {
        uint32_t p = 0;
        check(lumos_model_precision(m_, &p), "reading the inference precision");
        return p;
    }

    /// (H * W) class labels of a (C, H, W) image.
    std::vector<uint8_t> segment(const Image &x, const CancelToken *cancel = nullptr) const {
        detail::check_size(x, x.channels, "segment");
        LumosTileOptions o;
        check(lumos_tile_options_default(&o), "tile options");
        std::vector<uint8_t> out(x.height * x.width);
        check(lumos_segment(m_, x.data.data(), x.channels, x.height, x.width, &o, cancel ? cancel->get() : nullptr,
                            out.data(), out.size()),
              "segmenting");
        return out;
    }

    /// (2 * H * W) floats: the two structures of a one-channel (1, H, W) image.
    std::vector<float> decompose(const Image &x, size_t samples = 1, uint64_t seed = 0,
                                 const CancelToken *cancel = nullptr) const {
        if (x.channels != 1) throw std::invalid_argument("decompose takes a one-channel image");
        detail::check_size(x, 1, "decompose");
        LumosDecomposeOptions o;
        check(lumos_decompose_options_default(&o), "decompose options");
        o.samples = samples;
        o.seed = seed;
        std::vector<float> out(2 * x.height * x.width);
        check(lumos_decompose(m_, x.data.data(), x.height, x.width, &o, cancel ? cancel->get() : nullptr, out.data(),
                              out.size()),
              "decomposing");
        return out;
    }

private:
    LumosModel *m_ = nullptr;
    LumosModelInfo info_{};
};

}  // namespace lumos
