// DySample's sampling step on the CPU: bilinear, border-clamped sampling of X at S = G + O
// (Liu, Lu, Fu, Cao, "Learning to Upsample by Learning to Sample", ICCV 2023).
//
// Plain C++17, no Python or torch headers: yolo_dysample/cpu_sampling.py compiles it on first use and
// calls `dysample_sample` through ctypes with the tensors' data pointers. It computes what
// F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False) computes on the
// grid DySample builds, but
//   - it reads the offsets in input pixels and adds the bilinear positions G itself: no grid is built;
//   - point coordinates are computed in double precision (grid_sample rounds them through [-1, 1]);
//   - the neighbours and weights of a point are computed once per output row and reused by every
//     channel of its group, and each channel's output row is written in one contiguous pass;
//   - a point clamped onto the last column / row is interpolated from the pair (size - 2, size - 1)
//     with weight 1 on the last pixel, so every point reads a 2x2 block at fixed strides.
//
// Layouts (all contiguous; T is float or double):
//   input     (batch, channels, height, width)
//   offsets   (batch, groups * scale * scale * 2, height, width), channels ordered (group, sub-pixel row
//             i, sub-pixel column j, axis), axis 0 = x, 1 = y: O in input pixels
//   initial   (groups * scale * scale * 2), the same channel order: G, where bilinear interpolation
//             samples relative to the input pixel's centre, (k - (scale - 1) / 2) / scale
//   output    (batch, channels, scale * height, scale * width)
#include <algorithm>
#include <climits>
#include <cstdint>
#include <new>
#include <thread>
#include <vector>

namespace {

struct Shape {
    int64_t batch, channels, height, width, groups, scale;
};

// Output rows [row_begin, row_end) of the (batch, group, output row) work list.
template <typename T>
void sample_rows(const T* input, const T* offsets, const T* initial, T* output, const Shape& shape,
                 int64_t row_begin, int64_t row_end) {
    const int64_t height = shape.height, width = shape.width, scale = shape.scale, groups = shape.groups;
    const int64_t group_channels = shape.channels / groups;
    const int64_t out_height = scale * height, out_width = scale * width;
    const int64_t plane = height * width, out_plane = out_height * out_width;
    const double last_column = static_cast<double>(width - 1), last_row = static_cast<double>(height - 1);
    const int64_t step_x = width > 1 ? 1 : 0, step_y = height > 1 ? width : 0;  // right / lower neighbour
    const int64_t max_left = std::max<int64_t>(width - 2, 0), max_top = std::max<int64_t>(height - 2, 0);
    std::vector<int32_t> corner(out_width);  // top-left neighbour of each point of the row (plane < 2^31)
    std::vector<T> east(out_width), south(out_width);  // distance past it, in [0, 1]
    for (int64_t row = row_begin; row < row_end; ++row) {
        const int64_t out_y = row % out_height, group = (row / out_height) % groups;
        const int64_t b = row / (out_height * groups);
        const int64_t h = out_y / scale, i = out_y % scale;
        const int64_t first_offset = ((group * scale) + i) * scale * 2;  // channel (group, i, j = 0, axis = 0)
        const T* row_offsets = offsets + (b * groups * scale * scale * 2 + first_offset) * plane + h * width;
        for (int64_t out_x = 0; out_x < out_width; ++out_x) {
            const int64_t w = out_x / scale, j = out_x % scale;
            const T* point = row_offsets + j * 2 * plane + w;
            // input pixel (h, w)'s centre is at index (h, w); border padding clamps into [0, size - 1]
            double x = static_cast<double>(w) + initial[first_offset + 2 * j] + point[0];
            double y = static_cast<double>(h) + initial[first_offset + 2 * j + 1] + point[plane];
            x = x > 0 ? x : 0;  // written so that NaN lands on 0, never out of bounds
            x = x < last_column ? x : last_column;
            y = y > 0 ? y : 0;
            y = y < last_row ? y : last_row;
            const int64_t left = std::min(static_cast<int64_t>(x), max_left);  // floor (x >= 0), <= size - 2
            const int64_t top = std::min(static_cast<int64_t>(y), max_top);
            corner[out_x] = static_cast<int32_t>(top * width + left);
            east[out_x] = static_cast<T>(x - static_cast<double>(left));
            south[out_x] = static_cast<T>(y - static_cast<double>(top));
        }
        const int64_t first_channel = b * shape.channels + group * group_channels;
        for (int64_t c = 0; c < group_channels; ++c) {
            const T* source = input + (first_channel + c) * plane;
            T* target = output + (first_channel + c) * out_plane + out_y * out_width;
            for (int64_t out_x = 0; out_x < out_width; ++out_x) {
                const T* block = source + corner[out_x];  // the 2x2 neighbours
                const T top_left = block[0], top_right = block[step_x];
                const T bottom_left = block[step_y], bottom_right = block[step_y + step_x];
                const T upper = top_left + east[out_x] * (top_right - top_left);  // lerp along x, then y
                const T lower = bottom_left + east[out_x] * (bottom_right - bottom_left);
                target[out_x] = upper + south[out_x] * (lower - upper);
            }
        }
    }
}

template <typename T>
void sample(const void* input, const void* offsets, const void* initial, void* output, const Shape& shape,
            int64_t threads) {
    const int64_t rows = shape.batch * shape.groups * shape.scale * shape.height;
    threads = std::max<int64_t>(1, std::min(threads, rows));
    auto run = [&](int64_t part) {
        sample_rows(static_cast<const T*>(input), static_cast<const T*>(offsets), static_cast<const T*>(initial),
                    static_cast<T*>(output), shape, rows * part / threads, rows * (part + 1) / threads);
    };
#ifdef _OPENMP
    // Built with -fopenmp: the library binds to the libgomp.so.1 torch has already loaded, so the shares run on
    // torch's own OpenMP threads. New std::threads would wait for a core while those threads still spin after
    // the offset convolution (measured: two threads, LP forward 17 ms with std::thread, 12 ms with OpenMP).
    bool failed = false;
#pragma omp parallel for num_threads(static_cast<int>(threads)) schedule(static, 1)
    for (int64_t part = 0; part < threads; ++part) {
        try {
            run(part);
        } catch (...) {  // nothing may leave an OpenMP region
#pragma omp critical
            failed = true;
        }
    }
    if (failed) throw std::bad_alloc();
#else
    std::vector<std::thread> workers;
    for (int64_t part = 1; part < threads; ++part) workers.emplace_back(run, part);
    run(0);  // the caller's thread takes the first share
    for (auto& worker : workers) worker.join();
#endif
}

}  // namespace

// Returns 0 on success. element_size: 4 (float) or 8 (double); threads: 1 runs on the caller's thread.
extern "C" int dysample_sample(const void* input, const void* offsets, const void* initial, void* output,
                               int64_t element_size, int64_t batch, int64_t channels, int64_t height,
                               int64_t width, int64_t groups, int64_t scale, int64_t threads) {
    if (batch < 1 || height < 1 || width < 1 || scale < 1 || groups < 1 || channels < 1 || channels % groups)
        return 2;
    if (height * width > INT32_MAX) return 5;  // neighbour indices are int32
    const Shape shape{batch, channels, height, width, groups, scale};
    try {
        if (element_size == 4)
            sample<float>(input, offsets, initial, output, shape, threads);
        else if (element_size == 8)
            sample<double>(input, offsets, initial, output, shape, threads);
        else
            return 3;
    } catch (...) {  // a thread could not start, or no memory for the row buffers
        return 4;
    }
    return 0;
}
