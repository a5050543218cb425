// Fused elementwise work of one RWKV-7 block for T > 1 tokens (prefill), for the `cpu` and `int8`
// backends (plugins/cpu_fused.py, `prefill_block`). The GEMMs stay in torch (oneDNN, AVX512-BF16);
// these kernels replace the ~50 torch elementwise ops between them, each of which read and wrote
// whole [T, C] tensors in bf16 at ~1 ms per op for 512 tokens. Same math as rwkvkit/models/rwkv7.py,
// in fp32 inside; activations are read and written in the GEMM dtype (fp32 or bf16, `bf16` flag).
// Appended to cpu_rwkv7.cpp and cpu_decode.cpp (one translation unit): reuses their `Layer`.
//   prefill_mix: [x += add;] layer norm, token shift and the n lerp mixes of a block's input;
//   prefill_wkv: decay, a, kk, k, value residual, WKV-7 scan, ln_x, bonus and gate, per (batch, head);
//   relu_square: the FFN activation, in place.
namespace {

// 16-float vectors (GCC vector extensions: one zmm with AVX-512, portable elsewhere). Explicit
// vectors, because GCC left the `omp simd` versions of these loops scalar at run time.
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
inline float hsum(v16 v) {
    float s = 0.f;
    for (int i = 0; i < kLanes; ++i) s += v[i];
    return s;
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

// layer norm of one row (C a multiple of 16), fp32
void norm_row(const float* x, const float* w, const float* b, int64_t C, float eps, float* y) {
    v16 sum = {}, sq = {};
    for (int64_t c = 0; c < C; c += kLanes) sum += vload(x + c);
    const float mean = hsum(sum) / C;
    for (int64_t c = 0; c < C; c += kLanes) {
        const v16 d = vload(x + c) - mean;
        sq += d * d;
    }
    const float inv = 1.f / std::sqrt(hsum(sq) / C + eps);
    for (int64_t c = 0; c < C; c += kLanes) vstore(y + c, (vload(x + c) - mean) * inv * vload(w + c) + vload(b + c));
}

template <class T>
void mix(const Layer* L, int64_t B, int64_t Tn, float* x, const T* add, const float* ln_w, const float* ln_b, const float* prev,
         const float* const* mixes, int64_t n_mix, float* xn, T* out, int threads) {
    const int64_t C = L->C, rows = B * Tn;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t row = 0; row < rows; ++row) {
            float* xr = x + row * C;
            if (add != nullptr)
                for (int64_t c = 0; c < C; c += kLanes) vstore(xr + c, vload(xr + c) + vload(add + row * C + c));
            norm_row(xr, ln_w, ln_b, C, 1e-5f, xn + row * C);
        }
#pragma omp for schedule(static)
        for (int64_t row = 0; row < rows; ++row) {
            const float* cur = xn + row * C;
            const float* before = row % Tn == 0 ? prev + row / Tn * C : cur - C;
            for (int64_t c = 0; c < C; c += kLanes) {
                const v16 xc = vload(cur + c), dx = vload(before + c) - xc;
                for (int64_t m = 0; m < n_mix; ++m) vstore(out + (m * rows + row) * C + c, xc + dx * vload(mixes[m] + c));
            }
        }
    }
}

// The WKV-7 scan with the per-head work around it, one (batch, head) per task. The head's state is
// held transposed, St[j][i] = S[i][j] (key index j first), so that every step is a vector op over
// the value index i with per-key broadcasts: no horizontal sums. One pass over the state per token
// updates it, accumulates y = S r, and already forms the next token's S kk (sa), which needs the
// updated state. Heads narrower than kHead are zero-padded (padded lanes stay zero).
constexpr int64_t kHead = 64, kVecs = kHead / kLanes;

struct Token {  // one token's per-head inputs to the scan, fp32, zero past N
    float dec[kHead], kk[kHead], ka[kHead], kw[kHead], r[kHead];
    v16 v[kVecs];
    float bonus;
};

template <class T>
void prepare(const Layer* L, int64_t off, int64_t ch, const T* r, const T* k, const T* v, const T* wl, const T* al, const T* vl,
             const T* v_first, Token& tok) {
    const float decay_scale = std::exp(-0.5f);
    v16 norm = {}, bonus = {};
    for (int64_t q = 0; q < L->N / kLanes; ++q) {
        const int64_t j = q * kLanes, o = off + j, c = ch + j;
        vstore(tok.dec + j, vexp(-decay_scale * vsigmoid(vload(L->w0 + c) + vload(wl + o))));
        const v16 a = vsigmoid(vload(L->a0 + c) + vload(al + o)), kv = vload(k + o), kk = kv * vload(L->k_k + c);
        const v16 kw = kv * (1.f + (a - 1.f) * vload(L->k_a + c)), rv = vload(r + o);
        norm += kk * kk;
        bonus += rv * kw * vload(L->r_k + c);
        vstore(tok.kk + j, kk);
        vstore(tok.ka + j, a);  // times the normalised kk below
        vstore(tok.kw + j, kw);
        vstore(tok.r + j, rv);
        v16 vv = vload(v + o);
        if (v_first != nullptr) vv += (vload(v_first + o) - vv) * vsigmoid(vload(L->v0 + c) + vload(vl + o));
        tok.v[q] = vv;
    }
    const float inv = 1.f / std::fmax(std::sqrt(hsum(norm)), 1e-12f);
    for (int64_t j = 0; j < L->N; j += kLanes) {
        const v16 kk = vload(tok.kk + j) * inv;
        vstore(tok.kk + j, kk);
        vstore(tok.ka + j, vload(tok.ka + j) * kk);
    }
    tok.bonus = hsum(bonus);
}

template <class T>
void wkv(const Layer* L, int64_t B, int64_t Tn, const T* r, const T* k, const T* v, const T* wl, const T* al, const T* vl, const T* g,
         const T* v_first, const float* state_in, float* state_out, T* y, int threads) {
    const int64_t C = L->C, H = L->H, N = L->N;
#pragma omp parallel for collapse(2) num_threads(threads) schedule(static)
    for (int64_t b = 0; b < B; ++b) {
        for (int64_t h = 0; h < H; ++h) {
            v16 St[kHead][kVecs] = {}, sa[kVecs] = {};
            Token toks[2] = {};
            float* S = reinterpret_cast<float*>(St);
            const float* S0 = state_in + (b * H + h) * N * N;
            for (int64_t i = 0; i < N; ++i)
                for (int64_t j = 0; j < N; ++j) S[j * kHead + i] = S0[i * N + j];
            const int64_t ch = h * N;
            auto off = [&](int64_t t) { return (b * Tn + t) * C + ch; };
            prepare(L, off(0), ch, r, k, v, wl, al, vl, v_first, toks[0]);
            for (int64_t j = 0; j < N; ++j)
                for (int q = 0; q < kVecs; ++q) sa[q] += St[j][q] * toks[0].kk[j];
            for (int64_t t = 0; t < Tn; ++t) {
                const Token& cur = toks[t & 1];
                Token& next = toks[(t + 1) & 1];
                if (t + 1 < Tn)
                    prepare(L, off(t + 1), ch, r, k, v, wl, al, vl, v_first, next);
                else
                    std::memset(next.kk, 0, sizeof(next.kk));
                v16 yv[kVecs] = {}, sn[kVecs] = {};
                for (int64_t j = 0; j < N; ++j) {
                    const float d = cur.dec[j], ka = cur.ka[j], kw = cur.kw[j], rj = cur.r[j], kn = next.kk[j];
#pragma GCC unroll 4
                    for (int q = 0; q < kVecs; ++q) {
                        const v16 s = St[j][q] * d - sa[q] * ka + cur.v[q] * kw;
                        St[j][q] = s;
                        yv[q] += s * rj;
                        sn[q] += s * kn;
                    }
                }
                std::memcpy(sa, sn, sizeof(sa));
                v16 sum = {}, sq = {};  // ln_x: group norm, one group per head (eps 64e-5)
                for (int q = 0; q < N / kLanes; ++q) sum += yv[q];
                const float mean = hsum(sum) / N;
                for (int q = 0; q < N / kLanes; ++q) sq += (yv[q] - mean) * (yv[q] - mean);
                const float inv = 1.f / std::sqrt(hsum(sq) / N + 64e-5f);
                for (int q = 0; q < N / kLanes; ++q) {
                    const int64_t o = off(t) + q * kLanes, c = ch + q * kLanes;
                    const v16 normed = (yv[q] - mean) * inv * vload(L->lnx_w + c) + vload(L->lnx_b + c);
                    vstore(y + o, (normed + cur.bonus * cur.v[q]) * vload(g + o));
                }
            }
            float* S1 = state_out + (b * H + h) * N * N;
            for (int64_t i = 0; i < N; ++i)
                for (int64_t j = 0; j < N; ++j) S1[i * N + j] = S[j * kHead + i];
        }
    }
}

template <class T>
void relu_square_typed(int64_t n, T* h, int threads) {
    const int64_t vec = n / kLanes * kLanes;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < vec; i += kLanes) {
        const v16 f = vload(h + i), pos = f > 0.f ? f : 0.f;
        vstore(h + i, pos * pos);
    }
    if (vec < n) {  // the tail, through a padded copy
        T tail[kLanes] = {};
        std::memcpy(tail, h + vec, sizeof(T) * (n - vec));
        const v16 f = vload(tail), pos = f > 0.f ? f : 0.f;
        vstore(tail, pos * pos);
        std::memcpy(h + vec, tail, sizeof(T) * (n - vec));
    }
}

}  // namespace

extern "C" {

// x [B*T, C] fp32 (the residual stream, `add` [B*T, C] added in place first unless null), prev
// [B, C] fp32 (each sequence's last normed row from the state); writes xn [B*T, C] fp32 (normed x)
// and out [n_mix, B*T, C]: xn + (shifted xn - xn) * mixes[m].
void prefill_mix(const Layer* L, int64_t B, int64_t T, float* x, const void* add, const float* ln_w, const float* ln_b, const float* prev,
                 const float* const* mixes, int64_t n_mix, float* xn, void* out, int bf16, int threads) {
    if (bf16)
        mix(L, B, T, x, static_cast<const uint16_t*>(add), ln_w, ln_b, prev, mixes, n_mix, xn, static_cast<uint16_t*>(out), threads);
    else
        mix(L, B, T, x, static_cast<const float*>(add), ln_w, ln_b, prev, mixes, n_mix, xn, static_cast<float*>(out), threads);
}

// r, k, v, g [B*T, C] projections; wl, al, vl [B*T, C] LoRA outputs before w0/a0/v0 and the
// activations; v_first null in layer 0 (vl then unused). State [B, H, N, N] fp32, in and out
// distinct. Writes y [B*T, C]: (ln_x(wkv) + bonus) * g, the output projection's input.
// Returns 0, or 1 (nothing computed) when the layer's head size does not fit the kernel.
int prefill_wkv(const Layer* L, int64_t B, int64_t T, const void* r, const void* k, const void* v, const void* wl, const void* al,
                const void* vl, const void* g, const void* v_first, const float* state_in, float* state_out, void* y, int bf16, int threads) {
    if (L->N < kLanes || L->N > kHead || L->N % kLanes || L->C != L->H * L->N || B < 0 || T < 0) return 1;
    using U = const uint16_t*;
    using F = const float*;
    if (bf16)
        wkv(L, B, T, U(r), U(k), U(v), U(wl), U(al), U(vl), U(g), U(v_first), state_in, state_out, static_cast<uint16_t*>(y), threads);
    else
        wkv(L, B, T, F(r), F(k), F(v), F(wl), F(al), F(vl), F(g), F(v_first), state_in, state_out, static_cast<float*>(y), threads);
    return 0;
}

// h = relu(h)^2 in place, h [n] fp32 or bf16
void relu_square(int64_t n, void* h, int bf16, int threads) {
    if (bf16)
        relu_square_typed(n, static_cast<uint16_t*>(h), threads);
    else
        relu_square_typed(n, static_cast<float*>(h), threads);
}

}  // extern "C"
