// An acquisition-style C++ program linking liblumos through bindings/cpp/lumos.hpp: load
// a model once, then process a stream of frames as they arrive (segment, or decompose
// with a muSplit model). RAII frees everything, also when a call throws.
//
//   acquire_cpp MODEL.lumos MODALITY N      (frames simulated: ssqpm, qpi or fluo)
//   acquire_cpp MODEL.lumos FRAME.tif...    (frames read from TIFF files)
//
// Build (one line): c++ -std=c++17 -I include -I bindings/cpp bindings/cpp/acquire.cpp
//                    -L target/release -llumos -Wl,-rpath,$PWD/target/release
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "lumos.hpp"

int main(int argc, char **argv) {
    if (argc < 3) {
        std::fprintf(stderr, "usage: %s MODEL.lumos MODALITY N | MODEL.lumos FRAME.tif...\n", argv[0]);
        return 2;
    }
    try {
        const lumos::Model model(argv[1]);
        const lumos::CancelToken cancel;  // acquisition software would cancel it on "stop"
        const std::string first = argv[2];
        const bool simulated = first == "ssqpm" || first == "qpi" || first == "fluo";
        int n = argc - 2;
        if (simulated) {
            n = 3;
            if (argc > 3) {
                char *end = nullptr;
                const long v = std::strtol(argv[3], &end, 10);
                if (end == argv[3] || *end != '\0' || v < 1 || v > 100000) {
                    std::fprintf(stderr, "N = '%s': expected a whole number of frames from 1 to 100000\n", argv[3]);
                    return 2;
                }
                n = static_cast<int>(v);
            }
        }
        std::printf("model %s, %zu input channel(s)\n", model.kind().c_str(), model.info().n_input_channels);
        for (int i = 0; i < n; i++) {
            lumos::Image frame = simulated ? lumos::simulate(first, "{\"size\": 128}", i).first
                                           : lumos::read_tiff(argv[2 + i]);
            const auto t0 = std::chrono::steady_clock::now();
            std::string summary;
            if (model.info().can_decompose) {
                std::vector<float> parts = model.decompose(frame, 1, 0, &cancel);
                double sum[2] = {0, 0};
                const size_t hw = frame.height * frame.width;
                for (size_t k = 0; k < hw; k++) {
                    sum[0] += parts[k];
                    sum[1] += parts[hw + k];
                }
                summary = "mean " + std::to_string(sum[0] / hw) + " / " + std::to_string(sum[1] / hw);
            } else {
                std::vector<uint8_t> labels = model.segment(frame, &cancel);
                size_t fg = 0;
                for (uint8_t v : labels) fg += v != 0;
                summary = "foreground " + std::to_string(double(fg) / labels.size());
            }
            const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
            std::printf("frame %d: %zux%zu, %.1f ms, %s\n", i, frame.height, frame.width, ms, summary.c_str());
        }
        std::printf("processed %d frames\n", n);
        return 0;
    } catch (const lumos::Error &e) {
        std::fprintf(stderr, "acquire_cpp: %s\n", e.what());
        return 1;
    } catch (const std::exception &e) {
        std::fprintf(stderr, "acquire_cpp: %s\n", e.what());
        return 1;
    }
}
