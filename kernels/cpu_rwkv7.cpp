// CPU kernels of the `cpu` backend (plugins/cpu_backend.py), called through ctypes (plain C ABI).
//
// wkv7_f32: the WKV-7 recurrence over T tokens, one (batch, head) per OpenMP task, the head's
//   N x N state held in a local array (16 KB for N = 64: it stays in L1). Per token, row i:
//     sa_i = sum_j S[i][j] kk_j;  S[i][j] = S[i][j] w_j - sa_i (kk_j a_j) + v_i k_j;  y_i = sum_j S[i][j] r_j
// gemv_bf16: y = W x for bf16 weights W [rows, cols] and bf16 x (fp32 y), with AVX512-BF16 dot products
//   (vdpbf16ps) where the CPU has them and a portable bf16->fp32 path elsewhere. Decode is bound by
//   reading W, so halving its bytes is the point; rows are split across threads.
// gemv_i8: y = scale * (Q x) for int8 weights Q [rows, cols] with one fp32 scale per row and fp32 x:
//   a quarter of fp32's bytes per token. With AVX512-VNNI, x is rounded once per call to int16
//   (x ~ xq * amax/32767: relative error 1.5e-5 of the largest entry, far below bf16's) and
//   vpdpwssd does 32 int8*int16 products per instruction, so the kernel stays bound by reading
//   Q rather than by widening codes to fp32 (the fallback path, 4x more instructions).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <immintrin.h>
#include <vector>

extern "C" {

// Returns 0, or 1 (nothing computed) when N does not fit the fixed per-head arrays.
int wkv7_f32(int64_t B, int64_t T, int64_t H, int64_t N, float* state, const float* r, const float* w,
             const float* k, const float* v, const float* kk, const float* a, float* y, int threads) {
    if (N < 1 || N > 64 || B < 0 || T < 0 || H < 0) return 1;
#pragma omp parallel for collapse(2) num_threads(threads) schedule(static)
    for (int64_t b = 0; b < B; ++b) {
        for (int64_t h = 0; h < H; ++h) {
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
        }
    }
    return 0;
}

int has_avx512_bf16() { return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512f"); }

static inline float bf16_to_f32(uint16_t v) {
    uint32_t bits = uint32_t(v) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t to_bf16(float f) {  // round to nearest even, as torch does
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    return uint16_t((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

__attribute__((target("avx512f,avx512bw,avx512bf16"))) static void gemv_bf16_avx512(
    int64_t rows, int64_t cols, const uint16_t* W, const uint16_t* x, float* y, int threads) {
    const int64_t vec = cols / 32 * 32;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < rows; ++o) {
        const uint16_t* wr = W + o * cols;
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        int64_t c = 0;
        for (; c + 64 <= vec; c += 64) {
            acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_loadu_si512(wr + c), (__m512bh)_mm512_loadu_si512(x + c));
            acc1 = _mm512_dpbf16_ps(acc1, (__m512bh)_mm512_loadu_si512(wr + c + 32), (__m512bh)_mm512_loadu_si512(x + c + 32));
        }
        for (; c < vec; c += 32)
            acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_loadu_si512(wr + c), (__m512bh)_mm512_loadu_si512(x + c));
        float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
        for (; c < cols; ++c) sum += bf16_to_f32(wr[c]) * bf16_to_f32(x[c]);
        y[o] = sum;
    }
}

static void gemv_bf16_portable(int64_t rows, int64_t cols, const uint16_t* W, const uint16_t* x, float* y, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < rows; ++o) {
        const uint16_t* wr = W + o * cols;
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t c = 0; c < cols; ++c) sum += bf16_to_f32(wr[c]) * bf16_to_f32(x[c]);
        y[o] = sum;
    }
}

void gemv_bf16(int64_t rows, int64_t cols, const uint16_t* W, const uint16_t* x, float* y, int threads) {
    static const bool native = has_avx512_bf16();
    if (native)
        gemv_bf16_avx512(rows, cols, W, x, y, threads);
    else
        gemv_bf16_portable(rows, cols, W, x, y, threads);
}

__attribute__((target("avx512f,avx512bw"))) static void gemv_i8_avx512(int64_t rows, int64_t cols, const int8_t* Q,
                                                                     const float* scale, const float* x, float* y, int threads) {
    const int64_t vec = cols / 64 * 64;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < rows; ++o) {
        const int8_t* qr = Q + o * cols;
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(), acc2 = _mm512_setzero_ps(), acc3 = _mm512_setzero_ps();
        for (int64_t c = 0; c < vec; c += 64) {
            __m512i codes = _mm512_loadu_si512(qr + c);
            acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(codes, 0))), _mm512_loadu_ps(x + c), acc0);
            acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(codes, 1))), _mm512_loadu_ps(x + c + 16), acc1);
            acc2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(codes, 2))), _mm512_loadu_ps(x + c + 32), acc2);
            acc3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(codes, 3))), _mm512_loadu_ps(x + c + 48), acc3);
        }
        float sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0, acc1), _mm512_add_ps(acc2, acc3)));
        for (int64_t c = vec; c < cols; ++c) sum += float(qr[c]) * x[c];
        y[o] = sum * scale[o];
    }
}

static void gemv_i8_portable(int64_t rows, int64_t cols, const int8_t* Q, const float* scale, const float* x, float* y, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < rows; ++o) {
        const int8_t* qr = Q + o * cols;
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t c = 0; c < cols; ++c) sum += float(qr[c]) * x[c];
        y[o] = sum * scale[o];
    }
}

__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void gemv_i8_vnni(int64_t rows, int64_t cols, const int8_t* Q,
                                                                               const float* scale, const float* x, float* y, int threads) {
    float amax = 0.f;
    for (int64_t c = 0; c < cols; ++c) amax = std::fmax(amax, std::fabs(x[c]));
    const float step = amax > 0.f ? amax / 32767.f : 1.f;
    std::vector<int16_t> xq(cols + 64);
    for (int64_t c = 0; c < cols; ++c) xq[c] = int16_t(std::lrintf(x[c] / step));
    const int64_t vec = cols / 64 * 64;
    constexpr int64_t kFlush = 8192;  // int32 lanes gain <= 2 * 127 * 32767 per 64 columns: flush before overflow
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < rows; ++o) {
        const int8_t* qr = Q + o * cols;
        __m512 total = _mm512_setzero_ps();
        for (int64_t start = 0; start < vec; start += kFlush) {
            __m512i acc0 = _mm512_setzero_si512(), acc1 = _mm512_setzero_si512();
            const int64_t end = std::min(vec, start + kFlush);
            for (int64_t c = start; c < end; c += 64) {
                __m512i codes = _mm512_loadu_si512(qr + c);
                __m512i lo = _mm512_cvtepi8_epi16(_mm512_castsi512_si256(codes));
                __m512i hi = _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(codes, 1));
                acc0 = _mm512_dpwssd_epi32(acc0, lo, _mm512_loadu_si512(xq.data() + c));
                acc1 = _mm512_dpwssd_epi32(acc1, hi, _mm512_loadu_si512(xq.data() + c + 32));
            }
            total = _mm512_add_ps(total, _mm512_cvtepi32_ps(_mm512_add_epi32(acc0, acc1)));
        }
        float sum = _mm512_reduce_add_ps(total);
        for (int64_t c = vec; c < cols; ++c) sum += float(qr[c]) * float(xq[c]);
        y[o] = sum * step * scale[o];
    }
}

// Prefill with int8 weights runs the GEMM in int8 too (torch._int_mm, VNNI): each activation row is
// quantized symmetrically with its own scale (absmax / 127), and the int32 products are scaled back
// by row and weight-row scales. That is ~3.6x an fp32 GEMM here; the held-out perplexity of the
// demo model moves by < 0.1% (decode keeps 16-bit activations, see gemv_i8_vnni).
// x [rows, cols] fp32 or (bf16 != 0) bf16 -> q [rows, cols] int8 and step [rows] fp32.
void quantize_rows_i8(int64_t rows, int64_t cols, const void* x, int bf16, int8_t* q, float* step, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const float* xf = bf16 ? nullptr : static_cast<const float*>(x) + r * cols;
        const uint16_t* xb = bf16 ? static_cast<const uint16_t*>(x) + r * cols : nullptr;
        float amax = 0.f;
#pragma omp simd reduction(max : amax)
        for (int64_t c = 0; c < cols; ++c) amax = std::max(amax, std::fabs(bf16 ? bf16_to_f32(xb[c]) : xf[c]));
        const float s = amax > 0.f ? amax / 127.f : 1.f, inv = 1.f / s;
        step[r] = s;
        int8_t* out = q + r * cols;
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) out[c] = int8_t(std::nearbyint((bf16 ? bf16_to_f32(xb[c]) : xf[c]) * inv));
    }
}

// y[r][o] = acc[r][o] * step[r] * scale[o], in fp32 or (bf16 != 0) bf16 rounded to nearest even.
void rescale_i32(int64_t rows, int64_t cols, const int32_t* acc, const float* step, const float* scale, void* y, int bf16, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
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
    }
}

void gemv_i8(int64_t rows, int64_t cols, const int8_t* Q, const float* scale, const float* x, float* y, int threads) {
    static const bool vnni = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw");
    static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
    if (vnni)
        gemv_i8_vnni(rows, cols, Q, scale, x, y, threads);
    else if (avx512)
        gemv_i8_avx512(rows, cols, Q, scale, x, y, threads);
    else
        gemv_i8_portable(rows, cols, Q, scale, x, y, threads);
}

}  // extern "C"
