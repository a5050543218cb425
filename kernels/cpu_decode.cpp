// One RWKV-7 block for one token (decode, batch 1) in a single native call, for the `cpu` and
// `int8` backends (plugins/cpu_fused.py). Decode reads every weight once per token, so it is bound
// by memory bandwidth; the Python path also pays ~60 small torch ops per layer, which this removes.
// It is the same math as rwkvkit/models/rwkv7.py (the reference it is tested against):
//   time mixing:    token shift, r/k/v projections, decay/a/value/gate LoRAs, WKV-7 step, group
//                   norm, bonus, gated output projection;
//   channel mixing: token shift, relu(K x)^2, V.
// Activations are fp32 inside. Big matrices are fp32, bf16 or int8 with per-row scales; small
// vectors and LoRA factors are fp32 copies made at load time.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <immintrin.h>
#include <initializer_list>
#include <omp.h>
#include <vector>

extern "C" void gemv_bf16(int64_t rows, int64_t cols, const uint16_t* W, const uint16_t* x, float* y, int threads);
extern "C" void gemv_i8(int64_t rows, int64_t cols, const int8_t* Q, const float* scale, const float* x, float* y, int threads);

namespace {

enum Format : int32_t { F32 = 0, BF16 = 1, I8 = 2 };

struct Mat {
    const void* w;
    const float* scale;  // int8 only
    int64_t rows, cols;
    int32_t format;
};

__attribute__((target("avx512f"))) void gemv_f32_avx512(const Mat& m, const float* x, float* y, int threads) {
    const float* W = static_cast<const float*>(m.w);
    const int64_t cols = m.cols, vec = cols / 32 * 32;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < m.rows; ++o) {
        const float* wr = W + o * cols;
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        for (int64_t c = 0; c < vec; c += 32) {
            acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(wr + c), _mm512_loadu_ps(x + c), acc0);
            acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(wr + c + 16), _mm512_loadu_ps(x + c + 16), acc1);
        }
        float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
        for (int64_t c = vec; c < cols; ++c) sum += wr[c] * x[c];
        y[o] = sum;
    }
}

void gemv_f32_portable(const Mat& m, const float* x, float* y, int threads) {
    const float* W = static_cast<const float*>(m.w);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < m.rows; ++o) {
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t c = 0; c < m.cols; ++c) sum += W[o * m.cols + c] * x[c];
        y[o] = sum;
    }
}

// y = M x; `tmp` holds x rounded to bf16 for bf16 weights (as torch's bf16 linear rounds it)
void gemv(const Mat& m, const float* x, float* y, std::vector<uint16_t>& tmp, int threads) {
    if (m.format == I8) {
        gemv_i8(m.rows, m.cols, static_cast<const int8_t*>(m.w), m.scale, x, y, threads);
    } else if (m.format == BF16) {
        tmp.resize(m.cols);
        for (int64_t c = 0; c < m.cols; ++c) tmp[c] = to_bf16(x[c]);
        gemv_bf16(m.rows, m.cols, static_cast<const uint16_t*>(m.w), tmp.data(), y, threads);
    } else if (__builtin_cpu_supports("avx512f")) {
        gemv_f32_avx512(m, x, y, threads);
    } else {
        gemv_f32_portable(m, x, y, threads);
    }
}

// y[d] = sum_k x[k] A[k][d] for a LoRA factor A [K, D] stored row-major (input-major)
struct Lora {
    const float* x;
    const float* A;
    int64_t K, D;
    float* y;
};

// Several LoRA products in one parallel region. The factors' rows are cut into kLoraParts
// contiguous shares, each summed into its own partial outputs by one thread (so every thread
// streams whole rows: the factors are ~1.8 MB of fp32 per layer of the 0.1B shape, a fifth of an
// int8 token's bytes, too much to leave to one thread, and splitting the output columns instead
// made the threads read strided). The shares do not depend on the thread count, and neither does
// the result: `strategy.threads` changes speed, never the generated text.
constexpr int64_t kLoraParts = 8;

void lora_products(std::initializer_list<Lora> jobs, int threads) {
    int64_t width = 0;
    for (const Lora& job : jobs) width += job.D;
    std::vector<float> partial(size_t(kLoraParts) * width, 0.f);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t part = 0; part < kLoraParts; ++part) {
        float* mine = partial.data() + part * width;
        for (const Lora& job : jobs) {
            for (int64_t k = job.K * part / kLoraParts; k < job.K * (part + 1) / kLoraParts; ++k) {
                const float xk = job.x[k];
                const float* row = job.A + k * job.D;
#pragma omp simd
                for (int64_t d = 0; d < job.D; ++d) mine[d] += xk * row[d];
            }
            mine += job.D;
        }
    }
    int64_t offset = 0;
    for (const Lora& job : jobs) {
        for (int64_t d = 0; d < job.D; ++d) {
            float sum = 0.f;
            for (int64_t part = 0; part < kLoraParts; ++part) sum += partial[part * width + offset + d];
            job.y[d] = sum;
        }
        offset += job.D;
    }
}

void layer_norm(const float* x, const float* w, const float* b, int64_t n, float eps, float* y) {
    double mean = 0, var = 0;
    for (int64_t i = 0; i < n; ++i) mean += x[i];
    mean /= n;
    for (int64_t i = 0; i < n; ++i) var += (x[i] - mean) * (x[i] - mean);
    const float inv = 1.f / std::sqrt(float(var / n) + eps);
    for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - float(mean)) * inv * w[i] + b[i];
}

float sigmoid(float z) { return 1.f / (1.f + std::exp(-z)); }

}  // namespace

extern "C" {

// y = W x for fp32 W [rows, cols]: for the head, where torch's GEMV reached ~13 GB/s here
void gemv_f32(int64_t rows, int64_t cols, const float* W, const float* x, float* y, int threads) {
    std::vector<uint16_t> unused;
    gemv(Mat{W, nullptr, rows, cols, F32}, x, y, unused, threads);
}

struct Layer {
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
    const float *x_r, *x_w, *x_k, *x_v, *x_a, *x_g;
    const float *w0, *w1, *w2, *a0, *a1, *a2, *v0, *v1, *v2, *g1, *g2;  // v0..v2 null in layer 0
    const float *k_k, *k_a, *r_k, *lnx_w, *lnx_b, *ffn_x_k;
    Mat R, K, V, O, FK, FV;
    int64_t C, H, N, Dw, Da, Dv, Dg, F;
};

// The layout Python's ctypes mirror of Layer must have (plugins/cpu_fused.py checks it at load):
// sizes of Mat and Layer, then the offsets of R (the first matrix), C (the first size) and F (the last).
void layer_layout(int64_t* out) {
    out[0] = sizeof(Mat);
    out[1] = sizeof(Layer);
    out[2] = offsetof(Layer, R);
    out[3] = offsetof(Layer, C);
    out[4] = offsetof(Layer, F);
}

// x [C] in/out (residual stream); v_first [C] out for layer 0, in otherwise; the state is read
// from *_in and written to *_out (distinct buffers: the caller's state is never modified).
void decode_layer(const Layer* L, float* x, float* v_first, const float* att_x_in, float* att_x_out, const float* kv_in,
                  float* kv_out, const float* ffn_x_in, float* ffn_x_out, int threads) {
    const int64_t C = L->C, H = L->H, N = L->N;
    std::vector<float> buf(C * 16 + L->F + L->Dw + L->Da + L->Dv + L->Dg);
    float *xn = buf.data(), *xr = xn + C, *xw = xr + C, *xk = xw + C, *xv = xk + C, *xa = xv + C, *xg = xa + C;
    float *r = xg + C, *k = r + C, *v = k + C, *decay = v + C, *a = decay + C, *g = a + C, *kk = g + C, *y = kk + C;
    float* out = y + C;
    float *hidden = out + C, *lw = hidden + L->F, *la = lw + L->Dw, *lv = la + L->Da, *lg = lv + L->Dv;
    std::vector<uint16_t> tmp;

    // ---- time mixing
    layer_norm(x, L->ln1_w, L->ln1_b, C, 1e-5f, xn);
    for (int64_t c = 0; c < C; ++c) {
        const float dx = att_x_in[c] - xn[c];
        xr[c] = xn[c] + dx * L->x_r[c];
        xw[c] = xn[c] + dx * L->x_w[c];
        xk[c] = xn[c] + dx * L->x_k[c];
        xv[c] = xn[c] + dx * L->x_v[c];
        xa[c] = xn[c] + dx * L->x_a[c];
        xg[c] = xn[c] + dx * L->x_g[c];
        att_x_out[c] = xn[c];
    }
    gemv(L->R, xr, r, tmp, threads);
    gemv(L->K, xk, k, tmp, threads);
    gemv(L->V, xv, v, tmp, threads);
    const bool residual = L->v0 != nullptr;  // the value residual's LoRA (every layer but the first)
    float* lv_out = out;                     // `out` is free until the output projection
    lora_products({{xw, L->w1, C, L->Dw, lw}, {xa, L->a1, C, L->Da, la}, {xg, L->g1, C, L->Dg, lg}, {xv, L->v1, residual ? C : 0, L->Dv, lv}},
                  threads);
    for (int64_t d = 0; d < L->Dw; ++d) lw[d] = std::tanh(lw[d]);
    for (int64_t d = 0; d < L->Dg; ++d) lg[d] = sigmoid(lg[d]);
    lora_products({{lw, L->w2, L->Dw, C, decay}, {la, L->a2, L->Da, C, a}, {lg, L->g2, L->Dg, C, g}, {lv, L->v2, residual ? L->Dv : 0, C, lv_out}},
                  threads);
    const float scale = std::exp(-0.5f);
    for (int64_t c = 0; c < C; ++c) decay[c] = std::exp(-scale * sigmoid(L->w0[c] + decay[c]));
    for (int64_t c = 0; c < C; ++c) a[c] = sigmoid(L->a0[c] + a[c]);
    for (int64_t h = 0; h < H; ++h) {  // kk: unit-length per head (F.normalize, eps 1e-12)
        float norm = 0.f;
        for (int64_t n = 0; n < N; ++n) {
            kk[h * N + n] = k[h * N + n] * L->k_k[h * N + n];
            norm += kk[h * N + n] * kk[h * N + n];
        }
        const float inv = 1.f / std::fmax(std::sqrt(norm), 1e-12f);
        for (int64_t n = 0; n < N; ++n) kk[h * N + n] *= inv;
    }
    for (int64_t c = 0; c < C; ++c) k[c] = k[c] * (1.f + (a[c] - 1.f) * L->k_a[c]);
    if (!residual) {
        std::memcpy(v_first, v, sizeof(float) * C);
    } else {
        for (int64_t c = 0; c < C; ++c) v[c] += (v_first[c] - v[c]) * sigmoid(L->v0[c] + lv_out[c]);
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t h = 0; h < H; ++h) {  // the WKV-7 step, one head per thread
        const float* S0 = kv_in + h * N * N;
        float* S = kv_out + h * N * N;
        const int64_t o = h * N;
        for (int64_t i = 0; i < N; ++i) {  // `omp simd` reductions: vectorized (a plain float sum may not be reordered)
            float sa = 0.f;
#pragma omp simd reduction(+ : sa)
            for (int64_t j = 0; j < N; ++j) sa += S0[i * N + j] * kk[o + j];
            float yi = 0.f;
#pragma omp simd reduction(+ : yi)
            for (int64_t j = 0; j < N; ++j) {
                const float s = S0[i * N + j] * decay[o + j] - sa * kk[o + j] * a[o + j] + v[o + i] * k[o + j];
                S[i * N + j] = s;
                yi += s * r[o + j];
            }
            y[o + i] = yi;
        }
    }
    for (int64_t h = 0; h < H; ++h) {  // group norm (ln_x, eps 64e-5), bonus, gate
        const int64_t o = h * N;
        double mean = 0, var = 0;
        for (int64_t n = 0; n < N; ++n) mean += y[o + n];
        mean /= N;
        for (int64_t n = 0; n < N; ++n) var += (y[o + n] - mean) * (y[o + n] - mean);
        const float inv = 1.f / std::sqrt(float(var / N) + 64e-5f);
        float bonus = 0.f;
        for (int64_t n = 0; n < N; ++n) bonus += r[o + n] * k[o + n] * L->r_k[o + n];
        for (int64_t n = 0; n < N; ++n) {
            const float normed = (y[o + n] - float(mean)) * inv * L->lnx_w[o + n] + L->lnx_b[o + n];
            y[o + n] = (normed + bonus * v[o + n]) * g[o + n];
        }
    }
    gemv(L->O, y, out, tmp, threads);
    for (int64_t c = 0; c < C; ++c) x[c] += out[c];

    // ---- channel mixing
    layer_norm(x, L->ln2_w, L->ln2_b, C, 1e-5f, xn);
    for (int64_t c = 0; c < C; ++c) {
        xk[c] = xn[c] + (ffn_x_in[c] - xn[c]) * L->ffn_x_k[c];
        ffn_x_out[c] = xn[c];
    }
    gemv(L->FK, xk, hidden, tmp, threads);
    for (int64_t f = 0; f < L->F; ++f) hidden[f] = hidden[f] > 0.f ? hidden[f] * hidden[f] : 0.f;
    gemv(L->FV, hidden, out, tmp, threads);
    for (int64_t c = 0; c < C; ++c) x[c] += out[c];
}

// A stage's layers for one token, in order: one call from Python per token instead of one per
// layer. att_in / ffn_in / att_out / ffn_out are [n, C] (layer i at row i), kv_out [n, H*N*N];
// kv_in holds each layer's state pointer; x and v_first as for decode_layer.
// Returns 0, or 1 (nothing computed) when the layers' dimensions disagree.
int decode_layers(int64_t n, const Layer* const* layers, float* x, float* v_first, const float* att_in, const float* const* kv_in,
                  const float* ffn_in, float* att_out, float* kv_out, float* ffn_out, int threads) {
    for (int64_t i = 0; i < n; ++i) {
        const Layer* L = layers[i];
        if (L->N < 1 || L->C != L->H * L->N || L->C != layers[0]->C || L->H != layers[0]->H) return 1;
    }
    for (int64_t i = 0; i < n; ++i) {
        const Layer* L = layers[i];
        const int64_t C = L->C, S = L->H * L->N * L->N;
        decode_layer(L, x, v_first, att_in + i * C, att_out + i * C, kv_in[i], kv_out + i * S, ffn_in + i * C, ffn_out + i * C, threads);
    }
    return 0;
}

}  // extern "C"
