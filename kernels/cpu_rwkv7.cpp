// CPU kernels of the `cpu` and `int8` backends, called through ctypes (plain C ABI) from
// rwkvkit/native/cpu.py. One translation unit with cpu_mix.cpp and cpu_decode.cpp, in that order:
//   cpu_rwkv7.cpp  the products (`project`, `lora`) and helpers every op uses;
//   cpu_mix.cpp    the elementwise ops around them (`ln_mix`, `time_mix_core`);
//   cpu_decode.cpp `decode_layers`, a stage's blocks for one token composed of those ops.
// No math constant is typed here: epsilons, the decay scale and the mix order come from
// rwkvkit/models/rwkv7.py as arguments.
//
// This file:
//   project: y = epilogue(M x) [+ residual] for several matrices, each with its own inputs (one row
//     per decoded sequence), in one parallel region (each matrix's rows split evenly over the
//     threads). Decode reads every weight once per step, for all the batch's rows at once (tiles
//     of up to kTile input rows against kRegRows weight rows in registers, per pass over a block
//     of weight rows), so one row is bound by memory bandwidth and a batch by arithmetic; each
//     input row's sums are formed exactly as for a lone row, so a sequence's result does not
//     depend on its batch. The row kernels stream a matrix
//     in its stored format (fp32 AVX512; bf16 with AVX512-BF16 `vdpbf16ps`; int8 with one scale
//     per row, through AVX512-VNNI `vpdpwssd` on activations rounded once per call to int16 steps
//     of max|x|/32767, 1.5e-5 of the largest entry: far below bf16's error; int4 in groups with
//     a scale each, in kernels/cpu_i4.cpp), with portable fallbacks where the CPU lacks the instructions.
//   lora: act(x A) B for several low-rank factor pairs (fp32 or bf16) and rows, in two parallel regions.
//   wkv7_f32: the WKV-7 scan alone (for heads the time-mix kernel cannot take).
//   quantize_rows_i8 / rescale_i32: the int8 prefill GEMM's activations and output.
//   relu_square: the FFN activation in place, for the GEMM path.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <immintrin.h>
#include <memory>
#include <type_traits>
#include <vector>

namespace {

inline float bf16_to_f32(uint16_t v) {
    const uint32_t bits = uint32_t(v) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

inline uint16_t to_bf16(float f) {  // round to nearest even, as torch does
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    return uint16_t((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

// An uninitialized buffer (std::vector would zero it: a wasted pass over prefill-sized scratch)
template <class T>
std::unique_ptr<T[]> scratch(size_t n) {
    return std::unique_ptr<T[]>(new T[n]);
}

// Decode's per-step scratch (sized by the batch, not by a prompt): a buffer of at least n T's that
// the calling thread keeps for its next call, one per Use. Fresh buffers of this size came from
// mmap each time, and their page faults were ~10% of a B = 16 decode step.
template <class T, class Use>
T* reused(size_t n) {
    thread_local std::vector<T> buffer;
    if (buffer.size() < n) buffer.resize(n);
    return buffer.data();
}

inline float to_f32(float v) { return v; }
inline float to_f32(uint16_t v) { return bf16_to_f32(v); }
inline float to_f32(int16_t v) { return float(v); }
inline float to_f32(int8_t v) { return float(v); }

// 16-float vectors (GCC vector extensions: one zmm with AVX-512, portable elsewhere). Explicit
// vectors, because GCC left `omp simd` versions of the elementwise loops scalar at run time.
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16v __attribute__((vector_size(64)));
typedef uint32_t u16v __attribute__((vector_size(64)));
typedef uint16_t h16 __attribute__((vector_size(32)));
constexpr int64_t kLanes = 16;

inline v16 vload(const float* p) {
    v16 r;
    std::memcpy(&r, p, sizeof r);
    return r;
}
inline v16 vload(const uint16_t* p) {  // bf16 -> fp32: the bits in the high half
    h16 h;
    std::memcpy(&h, p, sizeof h);
    return (v16)(__builtin_convertvector(h, u16v) << 16);
}
inline void vstore(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }
inline void vstore(uint16_t* p, v16 v) {  // fp32 -> bf16, round to nearest even (as to_bf16)
    const u16v b = (u16v)v;
    const h16 h = __builtin_convertvector((b + 0x7fff + ((b >> 16) & 1)) >> 16, h16);
    std::memcpy(p, &h, sizeof h);
}
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));
inline float hsum(v16 v) {  // a tree of halves: a few shuffles instead of 15 dependent scalar adds
    const v8 h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    const v4 q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
    return (q[0] + q[2]) + (q[1] + q[3]);
}

// e^x to ~2 ulp: Cephes' expf polynomial, rounding by the 1.5 * 2^23 trick (no floor needed)
inline v16 vexp(v16 x) {
    x = x < -87.3f ? -87.3f : x;
    x = x > 88.7f ? 88.7f : x;
    const v16 n = (x * 1.44269504f + 12582912.f) - 12582912.f;
    const v16 r = x - n * 0.693359375f + n * 2.12194440e-4f;
    v16 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    return p * (v16)((__builtin_convertvector(n, i16v) + 127) << 23);
}

inline v16 vsigmoid(v16 z) { return 1.f / (1.f + vexp(-z)); }

inline float sigmoid(float z) { return 1.f / (1.f + std::exp(-z)); }

// The same values as rwkvkit.backend.Epilogue
enum Epilogue : int32_t { NONE = 0, TANH = 1, SIGMOID = 2, RELU_SQUARE = 3 };

inline float activate(float y, int32_t epilogue) {
    switch (epilogue) {
        case TANH: return std::tanh(y);
        case SIGMOID: return sigmoid(y);
        case RELU_SQUARE: {  // maxss, not a branch (GCC branches on y > 0): signs are random, and the mispredictions cost ~10% of a decode step
            const float pos = _mm_cvtss_f32(_mm_max_ss(_mm_set_ss(y), _mm_setzero_ps()));  // y > 0 ? y : 0 (NaN: 0)
            return pos * pos;
        }
        default: return y;
    }
}

bool is_epilogue(int32_t e) { return e >= NONE && e <= RELU_SQUARE; }

// ---- project: matrix-vector products

enum Format : int32_t { F32 = 0, BF16 = 1, I8 = 2, I4 = 3 };

struct Mat {
    const void* w;       // [rows, cols] row-major; int4: see kernels/cpu_i4.cpp
    const float* scale;  // [rows], int8; [rows, ceil(cols / group)], int4
    int64_t rows, cols;
    int32_t format;
    int32_t group;  // int4 only: columns per scale, a multiple of 64
};

// One product of `project`: y = epilogue(M x), plus residual when it is not null (it may be y),
// for n input rows (one per decoded sequence).
struct Product {
    const Mat* m;
    const float* x;  // [n, cols]
    float* y;        // [n, rows]
    const float* residual;
    int64_t n;
    int32_t epilogue;
};

inline void store(const Product& p, int64_t b, int64_t o, float sum) {
    const int64_t i = b * p.m->rows + o;
    const float v = activate(sum, p.epilogue);
    p.y[i] = p.residual != nullptr ? p.residual[i] + v : v;
}

// Weight rows per register block of the fp32/bf16/int8 kernels, and input rows per tile: each of
// the kRegRows x kTile (weight row, input row) pairs has one accumulator (24 of the 32 zmm), and
// every weight and input vector loaded serves kTile or kRegRows products.
constexpr int kRegRows = 4;
constexpr int kTile = 6;
constexpr int kTileI8 = 4;  // int8: each weight vector widened to int16 in a register too
constexpr int64_t kRowBlock = 8;  // weight rows per block: reread from cache for every tile of inputs

template <int NB>
using Tile = std::integral_constant<int, NB>;

// kernel(Tile<NB>, b0, lo, hi) over input rows [b0, b0 + NB) and weight rows [lo, hi): for each
// block of weight rows, every tile of input rows (TILE at most), so each weight is read from memory
// once for all n rows. A row's arithmetic is the same in any tile (the tile only repeats it NB times).
template <int TILE, class Kernel>
void over_tiles(int64_t n, int64_t lo, int64_t hi, Kernel kernel) {
    static_assert(TILE >= 1 && TILE <= 8);
    for (int64_t o = lo; o < hi; o += kRowBlock) {
        const int64_t end = std::min(hi, o + kRowBlock);
        int64_t b = 0;
        for (; b + TILE <= n; b += TILE) kernel(Tile<TILE>{}, b, o, end);
        switch (n - b) {  // fewer than TILE left
            case 1: kernel(Tile<1>{}, b, o, end); break;
            case 2: if constexpr (TILE > 2) kernel(Tile<2>{}, b, o, end); break;
            case 3: if constexpr (TILE > 3) kernel(Tile<3>{}, b, o, end); break;
            case 4: if constexpr (TILE > 4) kernel(Tile<4>{}, b, o, end); break;
            case 5: if constexpr (TILE > 5) kernel(Tile<5>{}, b, o, end); break;
            case 6: if constexpr (TILE > 6) kernel(Tile<6>{}, b, o, end); break;
            case 7: if constexpr (TILE > 7) kernel(Tile<7>{}, b, o, end); break;
            default: break;
        }
    }
}

// Weight rows [lo, hi) in blocks of kRegRows, the last few one at a time: block<NO>(o) takes rows [o, o + NO)
template <int NB, class Block>
inline void over_rows(int64_t lo, int64_t hi, Block block) {
    int64_t o = lo;
    if constexpr (NB > 1)
        for (; o + kRegRows <= hi; o += kRegRows) block(Tile<kRegRows>{}, o);
    for (; o < hi; ++o) block(Tile<1>{}, o);
}

// What the CPU runs (asked on first use: __builtin_cpu_supports is not ready during static initialization)
bool has_avx512() {
    static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
    return yes;
}
bool has_bf16_dot() {
    static const bool yes = has_avx512() && __builtin_cpu_supports("avx512bf16");
    return yes;
}
bool has_vnni() {
    static const bool yes = has_avx512() && __builtin_cpu_supports("avx512vnni");
    return yes;
}

// Each vector's 16 lanes summed, for K vectors at once (a transposing tree of shuffles instead of
// K separate reductions: after the products, the reductions were a third of the work at 768
// columns). Each sum is formed exactly as _mm512_reduce_add_ps forms it, (lo256 + hi256), then
// lo128 + hi128, then (e0 + e2) + (e1 + e3), whatever K is and wherever the vector sits; the
// inputs enter transposed (4 x 4) so that lane j of out[g] is vector 16 g + j's sum.
template <int K>
__attribute__((target("avx512f"), always_inline)) inline void reduced(const __m512* v, __m512* out) {
    if constexpr (K > 16) {
        reduced<16>(v, out);
        reduced<K - 16>(v + 16, out + 1);
    } else {
        __m512 a[16], s8[8], s4[4], s2[2];
        for (int i = 0; i < 16; ++i) a[i] = (i % 4) * 4 + i / 4 < K ? v[(i % 4) * 4 + i / 4] : _mm512_setzero_ps();
        for (int i = 0; i < 8; ++i)  // [x0-3, x4-7, y0-3, y4-7] + [x8-11, x12-15, y8-11, y12-15]
            s8[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44), _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
        for (int i = 0; i < 4; ++i)  // the 128-bit halves of each 256
            s4[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s8[2 * i], s8[2 * i + 1], 0x88), _mm512_shuffle_f32x4(s8[2 * i], s8[2 * i + 1], 0xDD));
        for (int i = 0; i < 2; ++i) {  // e0 + e2, e1 + e3
            const __m512d x = _mm512_castps_pd(s4[2 * i]), y = _mm512_castps_pd(s4[2 * i + 1]);
            s2[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
        }
        out[0] = _mm512_add_ps(_mm512_shuffle_ps(s2[0], s2[1], 0x88), _mm512_shuffle_ps(s2[0], s2[1], 0xDD));
    }
}

constexpr int sum_vectors(int sums) { return (sums + 15) / 16; }  // vectors holding that many of reduced's sums

// A tile's accumulators acc[r][b] (NO weight rows x NB input rows) reduced, input-row major: the
// sum of pair (r, b) is lane (b * NO + r) % 16 of out[(b * NO + r) / 16].
template <int NO, int NB>
__attribute__((target("avx512f"), always_inline)) inline void tile_sums(const __m512 (&acc)[NO][NB], __m512 (&out)[sum_vectors(NO * NB)]) {
    __m512 by_input[NB * NO];
    for (int b = 0; b < NB; ++b)
        for (int r = 0; r < NO; ++r) by_input[b * NO + r] = acc[r][b];
    reduced<NO * NB>(by_input, out);
}

// The sums of tile_sums as floats, flat[b * NO + r]
template <int NO, int NB>
__attribute__((target("avx512f"), always_inline)) inline void flat_sums(const __m512 (&sums)[sum_vectors(NO * NB)], float* flat) {
    if constexpr (NO * NB == 1) {
        flat[0] = _mm512_cvtss_f32(sums[0]);
    } else {
        float lanes[16 * sum_vectors(NO * NB)];
        for (int g = 0; g < sum_vectors(NO * NB); ++g) _mm512_storeu_ps(lanes + 16 * g, sums[g]);
        std::memcpy(flat, lanes, sizeof(float) * NO * NB);
    }
}

// Input row B onwards of a tile of 4 weight rows: its 4 sums (lanes 4 (B % 4) .. of sums[B / 4]),
// times step[B] then the rows' scales when step (int8), the epilogue, the residual, stored as one
// vector of 4 (the rows are consecutive outputs), each value exactly as `store` makes it.
template <int NB, int B = 0>
__attribute__((target("avx512f"), always_inline)) inline void store_quads(const Product& p, int64_t b0, int64_t o, const __m512* sums, const float* step) {
    if constexpr (B < NB) {
        __m128 v = _mm512_extractf32x4_ps(sums[B / 4], B % 4);
        if (step != nullptr) v = _mm_mul_ps(_mm_mul_ps(v, _mm_set1_ps(step[b0 + B])), _mm_loadu_ps(p.m->scale + o));
        if (p.epilogue == RELU_SQUARE) {  // maxps returns its second operand for a NaN, as activate's maxss
            v = _mm_max_ps(v, _mm_setzero_ps());
            v = _mm_mul_ps(v, v);
        }
        const int64_t i = (b0 + B) * p.m->rows + o;
        if (p.residual != nullptr) v = _mm_add_ps(_mm_loadu_ps(p.residual + i), v);
        _mm_storeu_ps(p.y + i, v);
        store_quads<NB, B + 1>(p, b0, o, sums, step);
    }
}

// Stores a tile through store_quads where it can (4 weight rows, no column tail left to add, an
// elementwise epilogue); false where the caller stores sum by sum. Storing each sum from a float
// array just written as vectors waited on the stores (~10% of an int8 B = 16 step).
template <int NO, int NB>
__attribute__((target("avx512f"), always_inline)) inline bool stored_by_quads(const Product& p, int64_t b0, int64_t o, const __m512 (&sums)[sum_vectors(NO * NB)],
                                                                               bool tail, const float* step) {
    if constexpr (NO != 4) {
        return false;
    } else {
        if (tail || (p.epilogue != NONE && p.epilogue != RELU_SQUARE)) return false;
        store_quads<NB>(p, b0, o, sums, step);
        return true;
    }
}

// The fp32, bf16 and int8 kernels below: NO weight rows from o against NB input rows (x: the
// tile's first, b0 its index), one accumulator per (weight row, input row) over all columns in
// order, 16 lanes wide, reduced by tile_sums, then a scalar tail: a pair's sum is the
// same whatever NO and NB are, so a lone row's equals its row in any batch. The first tile of a
// block (b0 == 0) also prefetches the same rows of the next block (kRowBlock rows on) into cache,
// a line per row per step: the hardware prefetcher alone left the first tile waiting on memory.
// A lone row (NB = 1) reads one weight row at a time, one sequential stream: reading four at once
// cost B = 1 up to ~1.5x, and prefetching did not win it back.
// Keeps v in a register: GCC otherwise folds its load into every instruction that reads it, once
// per weight row (loads, not arithmetic, then bound the fp32 and int8 kernels).
template <class V>
__attribute__((always_inline)) inline void in_register(V& v) {
    asm("" : "+v"(v));
}

// How many blocks ahead the tile numbered `tile` of a block prefetches (0: none, for a lone row):
// the first tile the next block, the second the one after, and so on up to kMaxAhead, so that
// memory stays busy while the later tiles compute from cache (the first tile alone left it idle
// then: B = 16 bf16 products of 768 columns ran ~1.2x slower).
constexpr int64_t kMaxAhead = 3;
inline int64_t blocks_ahead(int nb, int64_t tile) { return nb > 1 ? std::min(1 + tile, kMaxAhead) : 0; }

template <class W>
__attribute__((always_inline)) inline void prefetch_ahead(int64_t blocks, const W* rows, int64_t cols, int n) {
    if (blocks)
        for (int r = 0; r < n; ++r) _mm_prefetch(reinterpret_cast<const char*>(rows + (blocks * kRowBlock + r) * cols), _MM_HINT_T0);
}

template <int NO, int NB>
__attribute__((target("avx512f"), always_inline)) inline void f32_block(const Product& p, const float* x, int64_t b0, int64_t o) {
    const int64_t cols = p.m->cols, vec = cols / kLanes * kLanes;
    const float* wr = static_cast<const float*>(p.m->w) + o * cols;
    __m512 acc[NO][NB];
    for (int r = 0; r < NO; ++r)
        for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_ps();
    const int64_t ahead = blocks_ahead(NB, b0 / kTile);
    for (int64_t c = 0; c < vec; c += kLanes) {
        prefetch_ahead(ahead, wr + c, cols, NO);
        __m512 w[NO];
        for (int r = 0; r < NO; ++r) w[r] = _mm512_loadu_ps(wr + r * cols + c);
        for (int b = 0; b < NB; ++b) {
            __m512 xb = _mm512_loadu_ps(x + b * cols + c);
            in_register(xb);
            for (int r = 0; r < NO; ++r) acc[r][b] = _mm512_fmadd_ps(w[r], xb, acc[r][b]);
        }
    }
    __m512 sums[sum_vectors(NO * NB)];
    tile_sums<NO, NB>(acc, sums);
    if (stored_by_quads<NO, NB>(p, b0, o, sums, vec < cols, nullptr)) return;
    float flat[NO * NB];
    flat_sums<NO, NB>(sums, flat);
    for (int r = 0; r < NO; ++r) {
        for (int b = 0; b < NB; ++b) {
            const float* xb = x + b * cols;
            float sum = flat[b * NO + r];
            for (int64_t c = vec; c < cols; ++c) sum += wr[r * cols + c] * xb[c];
            store(p, b0 + b, o + r, sum);
        }
    }
}

template <int NB>
__attribute__((target("avx512f"))) void rows_f32_avx512(const Product& p, int64_t b0, int64_t lo, int64_t hi) {
    const float* x = p.x + b0 * p.m->cols;
    over_rows<NB>(lo, hi, [&](auto no, int64_t o) { f32_block<no.value, NB>(p, x, b0, o); });
}

// bf16 weights and inputs (x: rounded to bf16, as torch's bf16 linear rounds it), 32 columns per `vdpbf16ps`
template <int NO, int NB>
__attribute__((target("avx512f,avx512bw,avx512bf16"), always_inline)) inline void bf16_block(const Product& p, const uint16_t* x, int64_t b0, int64_t o) {
    const int64_t cols = p.m->cols, vec = cols / 32 * 32;
    const uint16_t* wr = static_cast<const uint16_t*>(p.m->w) + o * cols;
    __m512 acc[NO][NB];
    for (int r = 0; r < NO; ++r)
        for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_ps();
    const int64_t ahead = blocks_ahead(NB, b0 / kTile);
    for (int64_t c = 0; c < vec; c += 32) {
        prefetch_ahead(ahead, wr + c, cols, NO);
        __m512bh w[NO];
        for (int r = 0; r < NO; ++r) w[r] = (__m512bh)_mm512_loadu_si512(wr + r * cols + c);
        for (int b = 0; b < NB; ++b) {
            const __m512bh xb = (__m512bh)_mm512_loadu_si512(x + b * cols + c);
            for (int r = 0; r < NO; ++r) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], w[r], xb);
        }
    }
    __m512 sums[sum_vectors(NO * NB)];
    tile_sums<NO, NB>(acc, sums);
    if (stored_by_quads<NO, NB>(p, b0, o, sums, vec < cols, nullptr)) return;
    float flat[NO * NB];
    flat_sums<NO, NB>(sums, flat);
    for (int r = 0; r < NO; ++r) {
        for (int b = 0; b < NB; ++b) {
            const uint16_t* xb = x + b * cols;
            float sum = flat[b * NO + r];
            for (int64_t t = vec; t < cols; ++t) sum += bf16_to_f32(wr[r * cols + t]) * bf16_to_f32(xb[t]);
            store(p, b0 + b, o + r, sum);
        }
    }
}

// x: all input rows [n, cols] in bf16
template <int NB>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void rows_bf16_avx512(const Product& p, const uint16_t* x, int64_t b0, int64_t lo, int64_t hi) {
    x += b0 * p.m->cols;
    over_rows<NB>(lo, hi, [&](auto no, int64_t o) { bf16_block<no.value, NB>(p, x, b0, o); });
}

// int8 weights against the input rows as int16 steps of step[b] (see Input), each 64 columns as two
// halves of 32 through `vpdpwssd`. Integer sums are exact in any order (a lone row splits them over
// two accumulators, for a shorter dependency chain; a tile has one per pair), and each chunk of
// columns [start, end) is converted and reduced (tile_sums) on its own into part, then added to
// the pair's sum in chunk order: a lone row's arithmetic in any tile.
template <int NO, int NB>
__attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline)) inline void i8_chunk(const int8_t* qr, int64_t cols, const int16_t* x, int64_t ahead, int64_t start,
                                                                              int64_t end, __m512 (&part)[sum_vectors(NO * NB)]) {
    __m512i acc[NO][NB], acc2[NO][NB];  // acc2: the lone row's second accumulator
    for (int r = 0; r < NO; ++r)
        for (int b = 0; b < NB; ++b) acc[r][b] = acc2[r][b] = _mm512_setzero_si512();
    const auto half = [&](int64_t c, __m512i (&into)[NO][NB]) {
        __m512i w[NO];
        for (int r = 0; r < NO; ++r) w[r] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qr + r * cols + c)));
        for (int b = 0; b < NB; ++b) {
            __m512i xb = _mm512_loadu_si512(x + b * cols + c);
            in_register(xb);
            for (int r = 0; r < NO; ++r) into[r][b] = _mm512_dpwssd_epi32(into[r][b], w[r], xb);
        }
    };
    for (int64_t c = start; c < end; c += 64) {
        prefetch_ahead(ahead, qr + c, cols, NO);
        half(c, acc);
        half(c + 32, NB == 1 ? acc2 : acc);
    }
    __m512 lanes[NO][NB];
    for (int r = 0; r < NO; ++r)
        for (int b = 0; b < NB; ++b) lanes[r][b] = _mm512_cvtepi32_ps(NB == 1 ? _mm512_add_epi32(acc[r][b], acc2[r][b]) : acc[r][b]);
    tile_sums<NO, NB>(lanes, part);
}

// A tile's chunk as a call of its own: inlined next to the chunks' sums, GCC spilled the accumulators.
template <int NO, int NB>
__attribute__((target("avx512f,avx512bw,avx512vnni"), noinline)) void i8_chunk_apart(const int8_t* qr, int64_t cols, const int16_t* x, int64_t ahead,
                                                                                    int64_t start, int64_t end, __m512 (&part)[sum_vectors(NO * NB)]) {
    i8_chunk<NO, NB>(qr, cols, x, ahead, start, end, part);
}

template <int NO, int NB>
__attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline)) inline void i8_block(const Product& p, const int16_t* x, const float* step,
                                                                                          int64_t b0, int64_t o) {
    const int64_t cols = p.m->cols, vec = cols / 64 * 64;
    constexpr int64_t kFlush = 4096;  // int32 lanes gain <= 4 * 128 * 32767 per 64 columns: flush before overflow
    const int8_t* qr = static_cast<const int8_t*>(p.m->w) + o * cols;
    constexpr int G = sum_vectors(NO * NB);
    __m512 sums[G], part[G];
    for (int g = 0; g < G; ++g) sums[g] = _mm512_setzero_ps();
    for (int64_t start = 0; start < vec; start += kFlush) {
        const int64_t end = std::min(vec, start + kFlush);
        if constexpr (NO * NB == 1)
            i8_chunk<NO, NB>(qr, cols, x, 0, start, end, part);
        else
            i8_chunk_apart<NO, NB>(qr, cols, x, blocks_ahead(NB, b0 / kTileI8), start, end, part);
        for (int g = 0; g < G; ++g) sums[g] = _mm512_add_ps(sums[g], part[g]);
    }
    if (stored_by_quads<NO, NB>(p, b0, o, sums, vec < cols, step)) return;
    float flat[NO * NB];
    flat_sums<NO, NB>(sums, flat);
    for (int r = 0; r < NO; ++r) {
        for (int b = 0; b < NB; ++b) {
            const int16_t* xb = x + b * cols;
            float sum = flat[b * NO + r];
            for (int64_t c = vec; c < cols; ++c) sum += float(qr[r * cols + c]) * float(xb[c]);
            store(p, b0 + b, o + r, sum * step[b0 + b] * p.m->scale[o + r]);
        }
    }
}

template <int NB>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void rows_i8_vnni(const Product& p, const int16_t* x, const float* step, int64_t b0, int64_t lo,
                                                                       int64_t hi) {
    x += b0 * p.m->cols;
    over_rows<NB>(lo, hi, [&](auto no, int64_t o) { i8_block<no.value, NB>(p, x, step, b0, o); });
}

// (The fallbacks below take one input row at a time.)
__attribute__((target("avx512f,avx512bw"))) void rows_i8_avx512(const Product& p, int64_t b, int64_t lo, int64_t hi) {
    const int8_t* Q = static_cast<const int8_t*>(p.m->w);
    const int64_t cols = p.m->cols, vec = cols / 64 * 64;
    const float* x = p.x + b * cols;
    for (int64_t o = lo; o < hi; ++o) {
        const int8_t* qr = Q + o * cols;
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(), acc2 = _mm512_setzero_ps(), acc3 = _mm512_setzero_ps();
        for (int64_t c = 0; c < vec; c += 64) {
            const __m512i codes = _mm512_loadu_si512(qr + c);
            acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(codes, 0))), _mm512_loadu_ps(x + c), acc0);
            acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(codes, 1))), _mm512_loadu_ps(x + c + 16), acc1);
            acc2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(codes, 2))), _mm512_loadu_ps(x + c + 32), acc2);
            acc3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(codes, 3))), _mm512_loadu_ps(x + c + 48), acc3);
        }
        float sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0, acc1), _mm512_add_ps(acc2, acc3)));
        for (int64_t c = vec; c < cols; ++c) sum += float(qr[c]) * x[c];
        store(p, b, o, sum * p.m->scale[o]);
    }
}

// x: input row b
template <class W, class X>
void rows_portable(const Product& p, const X* x, int64_t b, int64_t lo, int64_t hi) {
    const W* M = static_cast<const W*>(p.m->w);
    const int64_t cols = p.m->cols;
    for (int64_t o = lo; o < hi; ++o) {
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t c = 0; c < cols; ++c) sum += to_f32(M[o * cols + c]) * to_f32(x[c]);
        store(p, b, o, p.m->format == I8 ? sum * p.m->scale[o] : sum);
    }
}

// One row of x as int16 steps of max|x|/32767, rounded to nearest even (as lrintf), 16 lanes at a time.
__attribute__((target("avx512f,avx512bw"))) float to_i16_steps(const float* x, int64_t cols, int16_t* out) {
    const int64_t vec = cols / kLanes * kLanes;
    __m512 vmax = _mm512_setzero_ps();
    for (int64_t c = 0; c < vec; c += kLanes) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(x + c)));
    float amax = _mm512_reduce_max_ps(vmax);
    for (int64_t c = vec; c < cols; ++c) amax = std::fmax(amax, std::fabs(x[c]));
    const float step = amax > 0.f ? amax / 32767.f : 1.f;
    const __m512 vstep = _mm512_set1_ps(step);
    for (int64_t c = 0; c < vec; c += kLanes)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c), _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_div_ps(_mm512_loadu_ps(x + c), vstep))));
    for (int64_t c = vec; c < cols; ++c) out[c] = int16_t(std::lrintf(x[c] / step));
    return step;
}

inline int64_t i4_padded(int64_t cols) { return (cols + 63) / 64 * 64; }  // int4 rows are whole 64-column chunks

// A product's input rows in the form its row kernel reads: bf16 for bf16 weights, int16 steps
// (one step per row) for int8 and int4 weights on a VNNI CPU (int4: rows of i4_padded(cols),
// zeros past cols), else the fp32 input itself.
struct Input {
    std::vector<uint16_t> bf16;
    std::vector<int16_t> i16;
    std::vector<float> step;

    void fill(const Product& p) {  // reuses the vectors' memory (project_products keeps Inputs per thread)
        const int64_t cols = p.m->cols, n = p.n;
        if (p.m->format == BF16) {
            bf16.resize(n * cols);
            const int64_t vec = cols / kLanes * kLanes;
            for (int64_t b = 0; b < n; ++b) {
                const float* x = p.x + b * cols;
                uint16_t* out = bf16.data() + b * cols;
                for (int64_t c = 0; c < vec; c += kLanes) vstore(out + c, vload(x + c));
                for (int64_t c = vec; c < cols; ++c) out[c] = to_bf16(x[c]);
            }
        } else if ((p.m->format == I8 || p.m->format == I4) && has_vnni()) {
            const int64_t stride = p.m->format == I4 ? i4_padded(cols) : cols;
            i16.assign(n * stride, 0);
            step.resize(n);
            for (int64_t b = 0; b < n; ++b) step[b] = to_i16_steps(p.x + b * cols, cols, i16.data() + b * stride);
        }
    }
};

void rows_i4(const Product& p, const Input& in, int64_t lo, int64_t hi);  // kernels/cpu_i4.cpp

void product_rows(const Product& p, const Input& in, int64_t lo, int64_t hi) {
    switch (p.m->format) {
        case BF16:
            if (has_bf16_dot())
                over_tiles<kTile>(p.n, lo, hi, [&](auto nb, int64_t b0, int64_t o0, int64_t o1) { rows_bf16_avx512<nb.value>(p, in.bf16.data(), b0, o0, o1); });
            else
                for (int64_t b = 0; b < p.n; ++b) rows_portable<uint16_t>(p, in.bf16.data() + b * p.m->cols, b, lo, hi);
            break;
        case I8:
            if (has_vnni())
                over_tiles<kTileI8>(p.n, lo, hi, [&](auto nb, int64_t b0, int64_t o0, int64_t o1) { rows_i8_vnni<nb.value>(p, in.i16.data(), in.step.data(), b0, o0, o1); });
            else if (has_avx512())
                for (int64_t b = 0; b < p.n; ++b) rows_i8_avx512(p, b, lo, hi);
            else
                for (int64_t b = 0; b < p.n; ++b) rows_portable<int8_t>(p, p.x + b * p.m->cols, b, lo, hi);
            break;
        case I4:
            rows_i4(p, in, lo, hi);
            break;
        default:
            if (has_avx512())
                over_tiles<kTile>(p.n, lo, hi, [&](auto nb, int64_t b0, int64_t o0, int64_t o1) { rows_f32_avx512<nb.value>(p, b0, o0, o1); });
            else
                for (int64_t b = 0; b < p.n; ++b) rows_portable<float>(p, p.x + b * p.m->cols, b, lo, hi);
    }
}

bool valid(const Mat& m) {
    return m.w != nullptr && m.rows >= 0 && m.cols >= 0 && m.format >= F32 && m.format <= I4 && (m.format < I8 || m.scale != nullptr) &&
           (m.format != I4 || (m.group > 0 && m.group % 64 == 0));
}

// The products in one parallel region: each thread takes the same share of every matrix's rows
// (no barrier between matrices), so a row's sum never depends on the thread count.
void project_products(const Product* ps, int64_t n, int threads) {
    thread_local std::vector<Input> mine;  // see reused
    std::vector<Input>& inputs = mine;      // the caller's, in the parallel body too
    if (int64_t(inputs.size()) < n) inputs.resize(n);
    int64_t rows = 0;
    for (int64_t i = 0; i < n; ++i) {
        inputs[i].fill(ps[i]);
        rows += ps[i].m->rows * ps[i].n;
    }
    parallel(rows >= 64, threads, [&](int64_t tid, int64_t nth) {
        for (int64_t i = 0; i < n; ++i) {
            const int64_t r = ps[i].m->rows;
            product_rows(ps[i], inputs[i], r * tid / nth, r * (tid + 1) / nth);
        }
    });
}

// ---- lora: low-rank products

// A factor pair: first [in, rank], second [rank, out], row-major, both fp32 or both bf16 (format).
struct LoraPair {
    const void* first;
    const void* second;
    int64_t in, rank, out;
    int32_t format;
};

// One job of `lora`: y [n, out] = act(x [n, in] first) second, for n rows (one per decoded sequence).
struct LoraJob {
    const LoraPair* pair;
    const float* x;
    float* y;
    int64_t n;
    int32_t act;
};

// y [n, D] = x [n, K] A for A [K, D] row-major.
struct VecMat {
    const float* x;
    const void* A;
    int64_t K, D, n;
    int32_t format;
    float* y;
};

// out[b] += x[b, k] A[k] for k in [k0, k1), rows b0 .. b0 + NB - 1 (out[b] at out + b * stride),
// each output summed over k in order: a row's sums are formed as for a lone row, whatever NB is.
// The rows' outputs stay in registers, V vectors at a time, across all k (adding into memory once
// per k cost a load and a store per multiply-add), and each vector of A loaded serves NB rows (one
// row at a time, the loads and bf16 widening of A were most of a B = 16 step's LoRA time).
template <class W, int NB, int V>
__attribute__((always_inline)) inline void add_columns(const VecMat& job, int64_t b0, int64_t k0, int64_t k1, int64_t d, float* out, int64_t stride) {
    const W* A = static_cast<const W*>(job.A);
    v16 s[NB][V];
    for (int b = 0; b < NB; ++b)
        for (int v = 0; v < V; ++v) s[b][v] = vload(out + (b0 + b) * stride + d + v * kLanes);
    for (int64_t k = k0; k < k1; ++k) {
        const W* row = A + k * job.D + d;
        v16 a[V];
        for (int v = 0; v < V; ++v) a[v] = vload(row + v * kLanes);
        for (int b = 0; b < NB; ++b) {
            const float xk = job.x[(b0 + b) * job.K + k];
            for (int v = 0; v < V; ++v) s[b][v] += xk * a[v];
        }
    }
    for (int b = 0; b < NB; ++b)
        for (int v = 0; v < V; ++v) vstore(out + (b0 + b) * stride + d + v * kLanes, s[b][v]);
}

template <class W, int NB>
void add_tile(const VecMat& job, int64_t b0, int64_t k0, int64_t k1, float* out, int64_t stride) {
    const int64_t D = job.D;
    int64_t d = 0;
    for (; d + 4 * kLanes <= D; d += 4 * kLanes) add_columns<W, NB, 4>(job, b0, k0, k1, d, out, stride);
    for (; d + kLanes <= D; d += kLanes) add_columns<W, NB, 1>(job, b0, k0, k1, d, out, stride);
    for (int b = 0; b < NB; ++b) {
        const float* x = job.x + (b0 + b) * job.K;
        float* o = out + (b0 + b) * stride;
        for (int64_t e = d; e < D; ++e) {
            float sum = o[e];
            for (int64_t k = k0; k < k1; ++k) sum += x[k] * to_f32(static_cast<const W*>(job.A)[k * D + e]);
            o[e] = sum;
        }
    }
}

constexpr int kLoraTile = 4;  // rows per add_tile: 16 accumulators, 4 vectors of A, a broadcast

template <class W>
void add_rows(const VecMat& job, int64_t k0, int64_t k1, float* out, int64_t stride) {
    int64_t b = 0;
    for (; b + kLoraTile <= job.n; b += kLoraTile) add_tile<W, kLoraTile>(job, b, k0, k1, out, stride);
    for (; b < job.n; ++b) add_tile<W, 1>(job, b, k0, k1, out, stride);
}

// Several vector-matrix products in one parallel region. The factors' rows are cut into
// kLoraParts contiguous shares, each summed into its own partial outputs by one thread (so every
// thread streams whole rows: the factors are ~1.8 MB of fp32 per layer of the 0.1B shape, a fifth
// of an int8 token's bytes, too much to leave to one thread, and splitting the output columns
// instead made the threads read strided). The shares do not depend on the thread count, and
// neither does the result: `strategy.threads` changes speed, never the generated text.
constexpr int64_t kLoraParts = 8;

// All jobs have the same number of rows; a part's partial sums are [rows, width] (the jobs' outputs side by side).
void vector_products(const VecMat* jobs, int64_t n, int threads) {
    int64_t width = 0;
    for (int64_t i = 0; i < n; ++i) width += jobs[i].D;
    const int64_t rows = n > 0 ? jobs[0].n : 0, share = rows * width;
    struct Partial;
    float* const partial = reused<float, Partial>(kLoraParts * share);
    std::fill(partial, partial + kLoraParts * share, 0.f);
    parallel(true, threads, [&](int64_t tid, int64_t nth) {
        for (int64_t part = kLoraParts * tid / nth; part < kLoraParts * (tid + 1) / nth; ++part) {
            float* mine = partial + part * share;
            for (int64_t i = 0; i < n; ++i) {
                const VecMat& job = jobs[i];
                const int64_t k0 = job.K * part / kLoraParts, k1 = job.K * (part + 1) / kLoraParts;
                if (job.format == BF16)
                    add_rows<uint16_t>(job, k0, k1, mine, width);
                else
                    add_rows<float>(job, k0, k1, mine, width);
                mine += job.D;
            }
        }
    });
    int64_t offset = 0;
    for (int64_t i = 0; i < n; ++i) {
        const int64_t D = jobs[i].D;
        for (int64_t b = 0; b < rows; ++b) {  // the parts in order, each output from 0.f; the part loop outside, so the columns vectorize
            float* y = jobs[i].y + b * D;
            std::fill(y, y + D, 0.f);
            for (int64_t part = 0; part < kLoraParts; ++part) {
                const float* from = partial + part * share + b * width + offset;
                for (int64_t d = 0; d < D; ++d) y[d] += from[d];
            }
        }
        offset += D;
    }
}

// The jobs' down products in one region, their activations, then the up products in another.
// All jobs have the same number of rows (the first's; checked by `lora`).
void lora_products(const LoraJob* jobs, int64_t n, int threads) {
    const int64_t rows = n > 0 ? jobs[0].n : 0;
    int64_t width = 0;
    for (int64_t i = 0; i < n; ++i) width += jobs[i].pair->rank;
    struct Hidden;
    std::vector<VecMat> down(n), up(n);
    float* h = reused<float, Hidden>(rows * width);
    for (int64_t i = 0; i < n; ++i) {
        const LoraPair& p = *jobs[i].pair;
        down[i] = {jobs[i].x, p.first, p.in, p.rank, rows, p.format, h};
        up[i] = {h, p.second, p.rank, p.out, rows, p.format, jobs[i].y};
        h += rows * p.rank;
    }
    vector_products(down.data(), n, threads);
    for (int64_t i = 0; i < n; ++i)
        for (int64_t d = 0; d < rows * down[i].D; ++d) down[i].y[d] = activate(down[i].y[d], jobs[i].act);
    vector_products(up.data(), n, threads);
}

bool valid(const LoraPair& p) {
    return p.first != nullptr && p.second != nullptr && p.in >= 0 && p.rank >= 0 && p.out >= 0 && (p.format == F32 || p.format == BF16);
}

template <class T>
void relu_square_typed(int64_t n, T* h, int threads) {
    const int64_t vec = n / kLanes * kLanes;
    parallel_for(vec / kLanes, threads, [&](int64_t i) {
        const v16 f = vload(h + i * kLanes), pos = f > 0.f ? f : 0.f;
        vstore(h + i * kLanes, pos * pos);
    });
    if (vec < n) {  // the tail, through a padded copy
        T tail[kLanes] = {};
        std::memcpy(tail, h + vec, sizeof(T) * (n - vec));
        const v16 f = vload(tail), pos = f > 0.f ? f : 0.f;
        vstore(tail, pos * pos);
        std::memcpy(h + vec, tail, sizeof(T) * (n - vec));
    }
}

// One row of x as int8 steps of max|x|/127 (its step stored), rounded to nearest even.
template <class X>
void quantize_row(const X* x, int64_t cols, int8_t* out, float* step) {
    float amax = 0.f;
#pragma omp simd reduction(max : amax)
    for (int64_t c = 0; c < cols; ++c) amax = std::max(amax, std::fabs(to_f32(x[c])));
    const float s = amax > 0.f ? amax / 127.f : 1.f, inv = 1.f / s;
    *step = s;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) out[c] = int8_t(std::nearbyint(to_f32(x[c]) * inv));
}

}  // namespace

extern "C" {

// y = epilogue(M x) [+ residual] for n products (see Product). Returns 0, or 1 (nothing computed)
// for a malformed matrix, epilogue or row count.
int project(const Product* ps, int64_t n, int threads) {
    const PoolScope scope;
    for (int64_t i = 0; i < n; ++i)
        if (ps[i].m == nullptr || !valid(*ps[i].m) || !is_epilogue(ps[i].epilogue) || ps[i].n < 0) return 1;
    project_products(ps, n, threads);
    return 0;
}

// y = act(x first) second for n jobs (see LoraJob). Returns 0, or 1 (nothing computed) for a
// malformed pair or activation, or jobs of different row counts.
int lora(const LoraJob* jobs, int64_t n, int threads) {
    const PoolScope scope;
    for (int64_t i = 0; i < n; ++i)
        if (jobs[i].pair == nullptr || !valid(*jobs[i].pair) || !is_epilogue(jobs[i].act) || jobs[i].n < 0 || jobs[i].n != jobs[0].n) return 1;
    lora_products(jobs, n, threads);
    return 0;
}

// The WKV-7 recurrence over T tokens, one (batch, head) at a time per thread, the head's N x N state
// held in a local array (16 KB for N = 64: it stays in L1). Per token, row i:
//   sa_i = sum_j S[i][j] kk_j;  S[i][j] = S[i][j] w_j - sa_i (kk_j a_j) + v_i k_j;  y_i = sum_j S[i][j] r_j
// Returns 0, or 1 (nothing computed) when N does not fit the fixed per-head arrays.
int wkv7_f32(int64_t B, int64_t T, int64_t H, int64_t N, float* state, const float* r, const float* w, const float* k,
             const float* v, const float* kk, const float* a, float* y, int threads) {
    if (N < 1 || N > 64 || B < 0 || T < 0 || H < 0) return 1;
    parallel_for(B * H, threads, [&](int64_t bh) {
        const int64_t b = bh / H, h = bh % H;
        float S[64 * 64];
        float* global = state + (b * H + h) * N * N;
        std::memcpy(S, global, sizeof(float) * N * N);
        float ka[64];
        for (int64_t t = 0; t < T; ++t) {
            const int64_t off = ((b * T + t) * H + h) * N;
            const float *rt = r + off, *wt = w + off, *kt = k + off, *vt = v + off, *kkt = kk + off, *at = a + off;
            for (int64_t j = 0; j < N; ++j) ka[j] = kkt[j] * at[j];
            for (int64_t i = 0; i < N; ++i) {
                float* row = S + i * N;
                float sa = 0.f;
#pragma omp simd reduction(+ : sa)
                for (int64_t j = 0; j < N; ++j) sa += row[j] * kkt[j];
                const float vi = vt[i];
                float yi = 0.f;
#pragma omp simd reduction(+ : yi)
                for (int64_t j = 0; j < N; ++j) {
                    row[j] = row[j] * wt[j] - sa * ka[j] + vi * kt[j];
                    yi += row[j] * rt[j];
                }
                y[off + i] = yi;
            }
        }
        std::memcpy(global, S, sizeof(float) * N * N);
    });
    return 0;
}

// Prefill with int8 weights runs the GEMM in int8 too (torch._int_mm, VNNI): each activation row is
// quantized symmetrically with its own scale (absmax / 127), and the int32 products are scaled back
// by row and weight-row scales. That is ~3.6x an fp32 GEMM here; the held-out perplexity of the
// demo model moves by < 0.1% (decode keeps 16-bit activations, see rows_i8_vnni).
// x [rows, cols] fp32 or (bf16 != 0) bf16 -> q [rows, cols] int8 and step [rows] fp32.
void quantize_rows_i8(int64_t rows, int64_t cols, const void* x, int bf16, int8_t* q, float* step, int threads) {
    // Captured by value: an int8 store may alias anything a reference points to, so GCC reloaded
    // every captured variable per element and the loops ran scalar (~2x slower).
    parallel_for(rows, threads, [=](int64_t r) {
        if (bf16)
            quantize_row(static_cast<const uint16_t*>(x) + r * cols, cols, q + r * cols, step + r);
        else
            quantize_row(static_cast<const float*>(x) + r * cols, cols, q + r * cols, step + r);
    });
}

// y[r][o] = acc[r][o] * step[r] * scale[o], in fp32 or (bf16 != 0) bf16 rounded to nearest even.
void rescale_i32(int64_t rows, int64_t cols, const int32_t* acc, const float* step, const float* scale, void* y, int bf16, int threads) {
    parallel_for(rows, threads, [=](int64_t r) {  // by value, as in quantize_rows_i8
        const int32_t* a = acc + r * cols;
        const float s = step[r];
        if (bf16) {
            uint16_t* out = static_cast<uint16_t*>(y) + r * cols;
#pragma omp simd
            for (int64_t c = 0; c < cols; ++c) out[c] = to_bf16(float(a[c]) * s * scale[c]);
        } else {
            float* out = static_cast<float*>(y) + r * cols;
#pragma omp simd
            for (int64_t c = 0; c < cols; ++c) out[c] = float(a[c]) * s * scale[c];
        }
    });
}

// h = relu(h)^2 in place, h [n] fp32 or (bf16 != 0) bf16
void relu_square(int64_t n, void* h, int bf16, int threads) {
    if (bf16)
        relu_square_typed(n, static_cast<uint16_t*>(h), threads);
    else
        relu_square_typed(n, static_cast<float*>(h), threads);
}

}  // extern "C"
