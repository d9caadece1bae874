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
//     channel of its group, and each channel's output row is written in one contiguous pass.
//
// Arithmetic as grid_sample's: a value is w0 * v0 + w1 * v1 per axis, and a neighbour past the last column or
// row is skipped, not read with weight 0 (so a huge or infinite pixel beside the border changes nothing).
//
// Two layouts, same values. Planar: per channel, one pass over a row's points, four scattered reads per value
// (the compiler turns them into gathers, which dominate its time); points whose right and lower neighbours are
// inside the map take a loop with fixed strides, the few on the last column or row are recomputed after it.
// Channels-last (float with AVX2, from about 8 channels per group): the input is first transposed to (height,
// width, channel) per group, so a point's four neighbours are contiguous runs over the channels (vector loads,
// no gathers), and tiles of 16 points are transposed back into the output rows with 8 x 8 shuffles. Measured on
// the paper's 256 x 120 x 120 map: the sampling about 1.7x faster than planar.
// Non-finite coordinates: NaN reads as -inf (the first column / row), +-inf clamp onto the border.
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
#include <cmath>
#include <cstdint>
#include <memory>
#include <new>
#include <system_error>
#include <thread>
#include <vector>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int kAbiVersion = 3;  // cpu_sampling.py refuses a library that answers another number

struct Shape {
    int64_t batch, channels, height, width, groups, scale;
};

// Where one output row samples: per point the top-left neighbour and the weights of both axes.
template <typename T>
struct RowPoints {
    std::vector<int32_t> corner;       // top-left neighbour in the plane (plane < 2^31)
    std::vector<int32_t> fast_corner;  // the same, or 0 for border points (the fixed-stride loop reads it)
    std::vector<T> left, right, upper, lower;  // weights of the neighbours x0, x0 + 1, y0, y0 + 1
    std::vector<uint8_t> has_right, has_below;
    std::vector<int32_t> border;  // points whose right or lower neighbour is outside the map

    explicit RowPoints(int64_t size)
        : corner(size), fast_corner(size), left(size), right(size), upper(size), lower(size), has_right(size),
          has_below(size) {
        border.reserve(size);
    }
};

// One axis: clamp onto [0, size - 1] (NaN -> 0), floor, and the second neighbour's weight; false if x0 + 1 is
// outside the map.
inline bool locate(double position, int64_t size, int64_t* first, double* second_weight) {
    const double last = static_cast<double>(size - 1);
    position = position > 0 ? position : 0;  // NaN fails the comparison: 0
    position = position < last ? position : last;
    const int64_t index = static_cast<int64_t>(position);  // floor: position >= 0
    *first = index;
    *second_weight = position - static_cast<double>(index);
    return index + 1 < size;
}

template <typename T>
void locate_row(const T* offsets, const T* initial, const Shape& shape, int64_t row, RowPoints<T>& points) {
    const int64_t height = shape.height, width = shape.width, scale = shape.scale, groups = shape.groups;
    const int64_t out_height = scale * height, out_width = scale * width, plane = height * width;
    const int64_t out_y = row % out_height, group = (row / out_height) % groups;
    const int64_t b = row / (out_height * groups);
    const int64_t h = out_y / scale, i = out_y % scale;
    const int64_t first_offset = ((group * scale) + i) * scale * 2;  // channel (group, i, j = 0, axis = 0)
    const T* row_offsets = offsets + (b * groups * scale * scale * 2 + first_offset) * plane + h * width;
    const bool fixed_strides_possible = width > 1 && height > 1;  // the fast loop reads [0, width + 1]
    points.border.clear();
    for (int64_t j = 0; j < scale; ++j) {  // sub-pixel column j of every input column w: output column w * s + j
        const T* point = row_offsets + j * 2 * plane;
        const double initial_x = initial[first_offset + 2 * j], initial_y = initial[first_offset + 2 * j + 1];
        for (int64_t w = 0, out_x = j; w < width; ++w, out_x += scale) {
            // input pixel (h, w)'s centre is at index (h, w); border padding clamps into [0, size - 1]
            const double x = static_cast<double>(w) + initial_x + point[w];
            const double y = static_cast<double>(h) + initial_y + point[plane + w];
            int64_t left = 0, top = 0;
            double east = 0, south = 0;
            const bool right_inside = locate(x, width, &left, &east);
            const bool below_inside = locate(y, height, &top, &south);
            points.left[out_x] = static_cast<T>(1.0 - east);
            points.right[out_x] = static_cast<T>(east);
            points.upper[out_x] = static_cast<T>(1.0 - south);
            points.lower[out_x] = static_cast<T>(south);
            points.has_right[out_x] = right_inside;
            points.has_below[out_x] = below_inside;
            const int32_t corner = static_cast<int32_t>(top * width + left);
            const bool fast = right_inside && below_inside && fixed_strides_possible;
            points.corner[out_x] = corner;
            points.fast_corner[out_x] = fast ? corner : 0;  // 0: the fast loop reads pixel 0's block (inside the map)
        }
    }
    for (int64_t out_x = 0; out_x < out_width; ++out_x)  // the border pass overwrites what the fast loop wrote
        if (!(points.has_right[out_x] && points.has_below[out_x]) || !fixed_strides_possible)
            points.border.push_back(static_cast<int32_t>(out_x));
}

// One point with the neighbours past the border skipped, exactly as grid_sample skips them. `step` is the
// distance between horizontal neighbours, `row_step` between vertical ones (1 and width planar, channels and
// width * channels channels-last).
template <typename T>
inline T border_value(const T* block, int64_t step, int64_t row_step, const RowPoints<T>& points, int64_t p) {
    const T upper = points.has_right[p] ? points.left[p] * block[0] + points.right[p] * block[step] : block[0];
    if (!points.has_below[p]) return upper;
    const T* below = block + row_step;
    const T lower = points.has_right[p] ? points.left[p] * below[0] + points.right[p] * below[step] : below[0];
    return points.upper[p] * upper + points.lower[p] * lower;
}

// Planar layout: output rows [row_begin, row_end) of the (batch, group, output row) work list, each channel's
// row in one pass over the points (four reads per value from the input plane).
template <typename T>
void sample_rows_planar(const T* input, const T* offsets, const T* initial, T* output, const Shape& shape,
                        int64_t row_begin, int64_t row_end) {
    const int64_t height = shape.height, width = shape.width, scale = shape.scale, groups = shape.groups;
    const int64_t group_channels = shape.channels / groups;
    const int64_t out_height = scale * height, out_width = scale * width;
    const int64_t plane = height * width, out_plane = out_height * out_width;
    const bool fixed_strides_possible = width > 1 && height > 1;
    RowPoints<T> points(out_width);
    for (int64_t row = row_begin; row < row_end; ++row) {
        locate_row(offsets, initial, shape, row, points);
        const int64_t out_y = row % out_height, group = (row / out_height) % groups;
        const int64_t b = row / (out_height * groups);
        const int64_t first_channel = b * shape.channels + group * group_channels;
        const bool all_border = !fixed_strides_possible || 4 * static_cast<int64_t>(points.border.size()) > out_width;
        const int32_t* corner = points.fast_corner.data();
        const T *left = points.left.data(), *right = points.right.data();
        const T *upper = points.upper.data(), *lower = points.lower.data();
        for (int64_t c = 0; c < group_channels; ++c) {
            const T* source = input + (first_channel + c) * plane;
            T* target = output + (first_channel + c) * out_plane + out_y * out_width;
            if (all_border) {  // every point through the careful path
                for (int64_t p = 0; p < out_width; ++p)
                    target[p] = border_value(source + points.corner[p], 1, width, points, p);
                continue;
            }
            for (int64_t p = 0; p < out_width; ++p) {
                const T* block = source + corner[p];  // the 2x2 neighbours, fixed strides
                const T top_row = left[p] * block[0] + right[p] * block[1];
                const T bottom_row = left[p] * block[width] + right[p] * block[width + 1];
                target[p] = upper[p] * top_row + lower[p] * bottom_row;
            }
            for (const int32_t p : points.border) target[p] = border_value(source + points.corner[p], 1, width, points, p);
        }
    }
}

// to[j * to_stride + i] = from[i * from_stride + j] for i < rows, j < columns. Full 8 x 8 float blocks use AVX2
// shuffles (eight loads, 24 shuffles, eight stores); the rest is scalar.
template <typename T>
inline void transpose(const T* from, int64_t from_stride, T* to, int64_t to_stride, int64_t rows, int64_t columns) {
    int64_t i0 = 0;
#if defined(__AVX2__)
    if constexpr (sizeof(T) == 4) {
        for (; i0 + 8 <= rows; i0 += 8) {
            int64_t j0 = 0;
            for (; j0 + 8 <= columns; j0 += 8) {
                const float* f = reinterpret_cast<const float*>(from) + i0 * from_stride + j0;
                float* t = reinterpret_cast<float*>(to) + j0 * to_stride + i0;
                __m256 r[8], u[8], v[8];
                for (int k = 0; k < 8; ++k) r[k] = _mm256_loadu_ps(f + k * from_stride);
                for (int k = 0; k < 8; k += 2) {
                    u[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
                    u[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
                }
                for (int k = 0; k < 8; k += 4) {
                    v[k] = _mm256_shuffle_ps(u[k], u[k + 2], 0x44);
                    v[k + 1] = _mm256_shuffle_ps(u[k], u[k + 2], 0xEE);
                    v[k + 2] = _mm256_shuffle_ps(u[k + 1], u[k + 3], 0x44);
                    v[k + 3] = _mm256_shuffle_ps(u[k + 1], u[k + 3], 0xEE);
                }
                for (int k = 0; k < 4; ++k) {
                    _mm256_storeu_ps(t + k * to_stride, _mm256_permute2f128_ps(v[k], v[k + 4], 0x20));
                    _mm256_storeu_ps(t + (k + 4) * to_stride, _mm256_permute2f128_ps(v[k], v[k + 4], 0x31));
                }
            }
            for (int64_t i = i0; i < i0 + 8; ++i)
                for (int64_t j = j0; j < columns; ++j) to[j * to_stride + i] = from[i * from_stride + j];
        }
    }
#endif
    for (int64_t i = i0; i < rows; ++i)
        for (int64_t j = 0; j < columns; ++j) to[j * to_stride + i] = from[i * from_stride + j];
}

// Channels-last copy of the input, (batch, groups, height, width, group channels): rows [task_begin, task_end)
// of the (batch, group, input row) list. Blocks of kBlock pixels keep the scattered writes inside L1.
template <typename T>
void to_channels_last(const T* input, T* packed, const Shape& shape, int64_t task_begin, int64_t task_end) {
    constexpr int64_t kBlock = 16;
    const int64_t height = shape.height, width = shape.width, groups = shape.groups;
    const int64_t group_channels = shape.channels / groups, plane = height * width;
    for (int64_t task = task_begin; task < task_end; ++task) {
        const int64_t h = task % height, group = (task / height) % groups, b = task / (height * groups);
        const T* source = input + (b * shape.channels + group * group_channels) * plane + h * width;
        T* target = packed + task * width * group_channels;
        for (int64_t w0 = 0; w0 < width; w0 += kBlock)  // rows: channels, columns: pixels
            transpose(source + w0, plane, target + w0 * group_channels, group_channels, group_channels,
                      std::min(kBlock, width - w0));
    }
}

// Channels-last layout: per point the four neighbours are contiguous runs over the group's channels (vector
// loads, no gathers); kTile points at a time go through a small buffer into each channel's output row.
template <typename T>
void sample_rows_channels_last(const T* packed, const T* offsets, const T* initial, T* output, const Shape& shape,
                               int64_t row_begin, int64_t row_end) {
    constexpr int64_t kTile = 16;
    const int64_t height = shape.height, width = shape.width, scale = shape.scale, groups = shape.groups;
    const int64_t channels = shape.channels / groups;
    const int64_t out_height = scale * height, out_width = scale * width, out_plane = out_height * out_width;
    const int64_t step = channels, row_step = width * channels;
    RowPoints<T> points(out_width);
    std::vector<T> tile(kTile * channels);
    for (int64_t row = row_begin; row < row_end; ++row) {
        locate_row(offsets, initial, shape, row, points);
        const int64_t out_y = row % out_height, group = (row / out_height) % groups;
        const int64_t b = row / (out_height * groups);
        const T* source = packed + (b * groups + group) * height * row_step;
        T* target = output + (b * shape.channels + group * channels) * out_plane + out_y * out_width;
        for (int64_t p0 = 0; p0 < out_width; p0 += kTile) {
            const int64_t count = std::min(kTile, out_width - p0);
            for (int64_t q = 0; q < count; ++q) {
                const int64_t p = p0 + q;
                const T* block = source + static_cast<int64_t>(points.corner[p]) * channels;
                T* values = tile.data() + q * channels;
                if (points.has_right[p] && points.has_below[p]) {
                    const T left = points.left[p], right = points.right[p];
                    const T upper = points.upper[p], lower = points.lower[p];
                    const T *top_left = block, *top_right = block + step;
                    const T *bottom_left = block + row_step, *bottom_right = block + row_step + step;
                    for (int64_t c = 0; c < channels; ++c) {
                        const T top_row = left * top_left[c] + right * top_right[c];
                        const T bottom_row = left * bottom_left[c] + right * bottom_right[c];
                        values[c] = upper * top_row + lower * bottom_row;
                    }
                } else {
                    for (int64_t c = 0; c < channels; ++c) values[c] = border_value(block + c, step, row_step, points, p);
                }
            }
            transpose(tile.data(), channels, target + p0, out_plane, count, channels);  // rows: points
        }
    }
}

// Runs task(part) for part in [0, parts): on OpenMP's threads, else on std::threads; 1 part on this thread.
template <typename Task>
void run_parts(int64_t parts, const Task& task) {
    if (parts == 1) {  // no parallel region at all: its start costs more than small maps take
        task(0);
        return;
    }
#ifdef _OPENMP
    // Built with -fopenmp: the library binds to the libgomp.so.1 torch has already loaded, so the shares run on
    // torch's own OpenMP threads. New std::threads would wait for a core while those threads still spin after
    // the offset convolution (measured: two threads, LP forward 17 ms with std::thread, 12 ms with OpenMP).
    // OpenMP may start fewer threads than asked: the loop still covers every share.
    bool failed = false;
#pragma omp parallel for num_threads(static_cast<int>(parts)) schedule(static, 1)
    for (int64_t part = 0; part < parts; ++part) {
        try {
            task(part);
        } catch (...) {  // nothing may leave an OpenMP region
#pragma omp critical
            failed = true;
        }
    }
    if (failed) throw std::bad_alloc();
#else
    std::vector<std::thread> workers;
    int64_t started = 1;
    for (; started < parts; ++started) {
        try {
            workers.emplace_back(task, started);
        } catch (const std::system_error&) {  // no thread to be had (limits, sandbox): this thread does the rest
            break;
        }
    }
    for (int64_t part = started; part < parts; ++part) task(part);
    task(0);  // the caller's thread takes the first share
    for (auto& worker : workers) worker.join();
#endif
}

template <typename T>
void sample(const void* input_data, const void* offsets_data, const void* initial_data, void* output_data,
            const Shape& shape, int64_t threads, bool channels_last) {
    const T* input = static_cast<const T*>(input_data);
    const T* offsets = static_cast<const T*>(offsets_data);
    const T* initial = static_cast<const T*>(initial_data);
    T* output = static_cast<T*>(output_data);
    const int64_t rows = shape.batch * shape.groups * shape.scale * shape.height;
    threads = std::max<int64_t>(1, std::min(threads, rows));
#if defined(__AVX2__)
    channels_last = channels_last && sizeof(T) == 4;  // its two transposes are fast only as 8 x 8 float shuffles
#else
    channels_last = false;
#endif
    if (!channels_last) {
        run_parts(threads, [&](int64_t part) {
            sample_rows_planar(input, offsets, initial, output, shape, rows * part / threads,
                               rows * (part + 1) / threads);
        });
        return;
    }
    // not a std::vector: no zero-filling of a buffer that is overwritten at once
    std::unique_ptr<T[]> packed(new T[static_cast<size_t>(shape.batch * shape.channels * shape.height * shape.width)]);
    const int64_t units = shape.batch * shape.groups, unit_rows = shape.scale * shape.height;
    if (units % threads == 0 || units >= 4 * threads) {
        // whole (image, group) units per thread: each transposes and samples its own, no barrier in between
        run_parts(threads, [&](int64_t part) {
            const int64_t first = units * part / threads, last = units * (part + 1) / threads;
            to_channels_last(input, packed.get(), shape, first * shape.height, last * shape.height);
            sample_rows_channels_last(packed.get(), offsets, initial, output, shape, first * unit_rows,
                                      last * unit_rows);
        });
        return;
    }
    const int64_t tasks = units * shape.height;  // else: transpose everything, then split the rows
    run_parts(threads, [&](int64_t part) {
        to_channels_last(input, packed.get(), shape, tasks * part / threads, tasks * (part + 1) / threads);
    });
    run_parts(threads, [&](int64_t part) {
        sample_rows_channels_last(packed.get(), offsets, initial, output, shape, rows * part / threads,
                                  rows * (part + 1) / threads);
    });
}

}  // namespace

// The interface version cpu_sampling.py checks before it uses a library.
extern "C" int dysample_abi_version() { return kAbiVersion; }

// What the compiler enabled for this library: bit 0 OpenMP, 1 SSE4.2, 2 AVX, 3 AVX2, 4 FMA, 5 AVX-512F, 6 NEON.
extern "C" int64_t dysample_build_features() {
    int64_t features = 0;
#ifdef _OPENMP
    features |= 1 << 0;
#endif
#ifdef __SSE4_2__
    features |= 1 << 1;
#endif
#ifdef __AVX__
    features |= 1 << 2;
#endif
#ifdef __AVX2__
    features |= 1 << 3;
#endif
#ifdef __FMA__
    features |= 1 << 4;
#endif
#ifdef __AVX512F__
    features |= 1 << 5;
#endif
#if defined(__ARM_NEON) || defined(__ARM_NEON__)
    features |= 1 << 6;
#endif
    return features;
}

// Returns 0 on success. element_size: 4 (float) or 8 (double); threads: 1 runs on the caller's thread;
// channels_last: 1 samples float inputs from a channels-last copy of the input where AVX2 is available (faster
// from about 8 channels per group: no gathers), 0 from the planar input. Both give the same values.
extern "C" int dysample_sample(const void* input, const void* offsets, const void* initial, void* output,
                               int64_t element_size, int64_t batch, int64_t channels, int64_t height,
                               int64_t width, int64_t groups, int64_t scale, int64_t threads,
                               int64_t channels_last) {
    if (batch < 0 || height < 0 || width < 0 || scale < 1 || groups < 1 || channels < 1 || channels % groups)
        return 2;
    if (batch == 0 || height == 0 || width == 0) return 0;  // nothing to write
    if (height * width > INT32_MAX) return 5;  // neighbour indices are int32
    const Shape shape{batch, channels, height, width, groups, scale};
    try {
        if (element_size == 4)
            sample<float>(input, offsets, initial, output, shape, threads, channels_last != 0);
        else if (element_size == 8)
            sample<double>(input, offsets, initial, output, shape, threads, channels_last != 0);
        else
            return 3;
    } catch (...) {  // no memory for the buffers
        return 4;
    }
    return 0;
}
