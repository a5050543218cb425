// The elementwise ops of an RWKV-7 block around its products, for any batch B and token count T
// (after cpu_rwkv7.cpp in the same translation unit: reuses its vectors and helpers). Same math as
// the torch defaults in rwkvkit/backend.py, in fp32 inside; activations are read and written in
// the GEMM dtype (fp32 or bf16, `bf16` flag), and so are the layer's per-channel vectors (the
// bf16 placement's own weights: no fp32 copies per call). For T > 1 they replace ~50 torch ops that each read
// and wrote whole [T, C] tensors; decode_layers (cpu_decode.cpp) calls them with T = 1.
//   ln_mix:        layer norm, token shift and the n mixes of a block's input;
//   time_mix_core: decay, a, kk, written k, value residual, WKV-7 scan, group norm, bonus and
//                  gate, per (batch, head).
namespace {

// layer norm of one row (C a multiple of 16) into fp32
template <class T>
void norm_row(const T* x, const T* w, const T* b, int64_t C, float eps, float* y) {
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

constexpr int64_t kParallelFloats = 1 << 16;  // below this much output, one thread is faster than waking the others

// x [B*T, C], prev [B, C] (each sequence's last normed row from the state); writes last [B, C]
// (the new last normed rows) and out [n_mix, B*T, C]: xn + (shifted xn - xn) * mixes[m].
template <class T>
void ln_mix_rows(int64_t B, int64_t Tn, int64_t C, const T* x, const T* w, const T* b, const T* prev, const T* const* mixes, int64_t n_mix,
                 float eps, T* last, T* out, int threads) {
    const int64_t rows = B * Tn;
    const auto xn = scratch<float>(rows * C);
    const bool worth_it = rows * C * (n_mix + 1) >= kParallelFloats;
    parallel(worth_it, threads, [&](int64_t tid, int64_t nth) {  // all rows normed before any is shifted
        for (int64_t row = rows * tid / nth; row < rows * (tid + 1) / nth; ++row) norm_row(x + row * C, w, b, C, eps, xn.get() + row * C);
    });
    parallel(worth_it, threads, [&](int64_t tid, int64_t nth) {
        for (int64_t row = rows * tid / nth; row < rows * (tid + 1) / nth; ++row) {
            const float* cur = xn.get() + row * C;
            const bool first = row % Tn == 0;
            for (int64_t c = 0; c < C; c += kLanes) {
                const v16 xc = vload(cur + c), dx = (first ? vload(prev + row / Tn * C + c) : vload(cur - C + c)) - xc;
                for (int64_t m = 0; m < n_mix; ++m) vstore(out + (m * rows + row) * C + c, xc + dx * vload(mixes[m] + c));
                if (row % Tn == Tn - 1) vstore(last + row / Tn * C + c, xc);
            }
        }
    });
}

// What time_mix_core reads besides its activations: a layer's vectors (in the activations' dtype),
// its head layout and the architecture's constants (rwkvkit/native/cpu.py mirrors it).
struct TimeMix {
    const void *w0, *a0, *v0, *k_k, *k_a, *r_k, *lnx_w, *lnx_b;  // v0 unused (may be null) without a value residual
    int64_t H, N;
    float group_norm_eps, decay_scale, kk_eps;
};

template <class T>
struct Vectors {  // a TimeMix's vectors, typed
    const T *w0, *a0, *v0, *k_k, *k_a, *r_k, *lnx_w, *lnx_b;
    explicit Vectors(const TimeMix& p)
        : w0(cast(p.w0)), a0(cast(p.a0)), v0(cast(p.v0)), k_k(cast(p.k_k)), k_a(cast(p.k_a)), r_k(cast(p.r_k)), lnx_w(cast(p.lnx_w)),
          lnx_b(cast(p.lnx_b)) {}
    static const T* cast(const void* p) { return static_cast<const T*>(p); }
};

constexpr int64_t kHead = 64, kVecs = kHead / kLanes;  // the largest head; N a multiple of 16 up to it

bool fits(const TimeMix& p) { return p.N >= kLanes && p.N <= kHead && p.N % kLanes == 0 && p.H >= 0; }

struct Token {  // one token's per-head inputs to the scan, fp32, zero past N
    float dec[kHead], kk[kHead], ka[kHead], kw[kHead], r[kHead];
    v16 v[kVecs];
    float bonus;
};

// decay, a, the normalised removal key kk, ka = kk * a, the written key kw, the value (after the
// residual when v_first is given) and the bonus r.(kw * r_k) of one token and head
template <class T>
void prepare(const TimeMix& p, const Vectors<T>& vec, int64_t off, int64_t ch, const T* r, const T* k, const T* v, const T* wl, const T* al,
             const T* vl, const T* v_first, Token& tok) {
    v16 norm = {}, bonus = {};
    for (int64_t q = 0; q < p.N / kLanes; ++q) {
        const int64_t j = q * kLanes, o = off + j, c = ch + j;
        vstore(tok.dec + j, vexp(-p.decay_scale * vsigmoid(vload(vec.w0 + c) + vload(wl + o))));
        const v16 a = vsigmoid(vload(vec.a0 + c) + vload(al + o)), kv = vload(k + o), kk = kv * vload(vec.k_k + c);
        const v16 kw = kv * (1.f + (a - 1.f) * vload(vec.k_a + c)), rv = vload(r + o);
        norm += kk * kk;
        bonus += rv * kw * vload(vec.r_k + c);
        vstore(tok.kk + j, kk);
        vstore(tok.ka + j, a);  // times the normalised kk below
        vstore(tok.kw + j, kw);
        vstore(tok.r + j, rv);
        v16 vv = vload(v + o);
        if (v_first != nullptr) vv += (vload(v_first + o) - vv) * vsigmoid(vload(vec.v0 + c) + vload(vl + o));
        tok.v[q] = vv;
    }
    const float inv = 1.f / std::fmax(std::sqrt(hsum(norm)), p.kk_eps);
    for (int64_t j = 0; j < p.N; j += kLanes) {
        const v16 kk = vload(tok.kk + j) * inv;
        vstore(tok.kk + j, kk);
        vstore(tok.ka + j, vload(tok.ka + j) * kk);
    }
    tok.bonus = hsum(bonus);
}

// y = (group_norm(wkv) + bonus * v) * g for one token and head; yv: the head's scan output
template <class T>
void emit(const TimeMix& p, const Vectors<T>& vec, int64_t off, int64_t ch, const v16* yv, const Token& tok, const T* g, T* y) {
    v16 sum = {}, sq = {};
    for (int q = 0; q < p.N / kLanes; ++q) sum += yv[q];
    const float mean = hsum(sum) / p.N;
    for (int q = 0; q < p.N / kLanes; ++q) sq += (yv[q] - mean) * (yv[q] - mean);
    const float inv = 1.f / std::sqrt(hsum(sq) / p.N + p.group_norm_eps);
    for (int q = 0; q < p.N / kLanes; ++q) {
        const int64_t o = off + q * kLanes, c = ch + q * kLanes;
        const v16 normed = (yv[q] - mean) * inv * vload(vec.lnx_w + c) + vload(vec.lnx_b + c);
        vstore(y + o, (normed + tok.bonus * tok.v[q]) * vload(g + o));
    }
}

// One token (decode): the state stays in its layout S[i][j] (value index i first); per row i,
// sa_i = S0[i] . kk, then S[i][j] = S0[i][j] dec_j - sa_i ka_j + v_i kw_j and y_i = S[i] . r.
template <class T>
void head_step(const TimeMix& p, const Vectors<T>& vec, int64_t off, int64_t ch, const Token& tok, const float* S0, float* S, const T* g, T* y) {
    const int64_t N = p.N;
    const float* v = reinterpret_cast<const float*>(tok.v);
    v16 yv[kVecs] = {};
    float* ys = reinterpret_cast<float*>(yv);
    for (int64_t i = 0; i < N; ++i) {
        const float* row = S0 + i * N;
        v16 dot = {};
        for (int64_t j = 0; j < N; j += kLanes) dot += vload(row + j) * vload(tok.kk + j);
        const float sa = hsum(dot), vi = v[i];
        v16 acc = {};
        for (int64_t j = 0; j < N; j += kLanes) {
            const v16 s = vload(row + j) * vload(tok.dec + j) - sa * vload(tok.ka + j) + vi * vload(tok.kw + j);
            vstore(S + i * N + j, s);
            acc += s * vload(tok.r + j);
        }
        ys[i] = hsum(acc);
    }
    emit(p, vec, off, ch, yv, tok, g, y);
}

// T tokens (prefill): the head's state is held transposed, St[j][i] = S[i][j] (key index j first),
// so that every step is a vector op over the value index i with per-key broadcasts: no horizontal
// sums. One pass over the state per token updates it, accumulates y = S r, and already forms the
// next token's S kk (sa), which needs the updated state. Padded lanes past N stay zero.
template <class T>
void head_scan(const TimeMix& p, const Vectors<T>& vec, int64_t Tn, const float* S0, float* S1, const T* r, const T* k, const T* v, const T* wl, const T* al,
               const T* vl, const T* g, const T* v_first, int64_t b, int64_t h, T* y) {
    const int64_t C = p.H * p.N, N = p.N, ch = h * N;
    v16 St[kHead][kVecs] = {}, sa[kVecs] = {};
    Token toks[2] = {};
    float* S = reinterpret_cast<float*>(St);
    for (int64_t i = 0; i < N; ++i)
        for (int64_t j = 0; j < N; ++j) S[j * kHead + i] = S0[i * N + j];
    auto off = [&](int64_t t) { return (b * Tn + t) * C + ch; };
    prepare(p, vec, off(0), ch, r, k, v, wl, al, vl, v_first, toks[0]);
    for (int64_t j = 0; j < N; ++j)
        for (int q = 0; q < kVecs; ++q) sa[q] += St[j][q] * toks[0].kk[j];
    for (int64_t t = 0; t < Tn; ++t) {
        const Token& cur = toks[t & 1];
        Token& next = toks[(t + 1) & 1];
        if (t + 1 < Tn)
            prepare(p, vec, off(t + 1), ch, r, k, v, wl, al, vl, v_first, next);
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
        emit(p, vec, off(t), ch, yv, cur, g, y);
    }
    for (int64_t i = 0; i < N; ++i)
        for (int64_t j = 0; j < N; ++j) S1[i * N + j] = S[j * kHead + i];
}

// Inputs [B*T, C]: the r/k/v projections, the decay/rate/value-residual LoRA outputs (before
// w0/a0/v0 and their activations), the gate; v_first null without a value residual (vl then
// unused). State [B, H, N, N] fp32, in and out distinct. Writes y [B*T, C]. One (batch, head) per task.
template <class T>
void time_mix_core_rows(const TimeMix& p, int64_t B, int64_t Tn, const T* r, const T* k, const T* v, const T* wl, const T* al,
                        const T* vl, const T* g, const T* v_first, const float* state_in, float* state_out, T* y, int threads) {
    const int64_t H = p.H, N = p.N;
    const Vectors<T> vec(p);
    parallel_for(B * H, threads, [&](int64_t bh) {
        const int64_t b = bh / H, h = bh % H;
        const float* S0 = state_in + (b * H + h) * N * N;
        float* S1 = state_out + (b * H + h) * N * N;
        if (Tn == 1) {
            Token tok;
            const int64_t off = b * H * N + h * N;
            prepare(p, vec, off, h * N, r, k, v, wl, al, vl, v_first, tok);
            head_step(p, vec, off, h * N, tok, S0, S1, g, y);
        } else if (Tn > 1) {
            head_scan(p, vec, Tn, S0, S1, r, k, v, wl, al, vl, g, v_first, b, h, y);
        }
    });
}

}  // namespace

extern "C" {

// x [B*T, C] and prev [B, C] (the state's last normed rows) in; last [B, C] (the new ones) and
// out [n_mix, B*T, C] out; weight, bias and mixes [C]; all fp32 or (bf16 != 0) all bf16. Returns
// 0, or 1 (nothing computed) when C is not a positive multiple of 16.
int ln_mix(int64_t B, int64_t T, int64_t C, const void* x, const void* w, const void* b, const void* prev, const void* const* mixes,
           int64_t n_mix, float eps, void* last, void* out, int bf16, int threads) {
    if (C < kLanes || C % kLanes || B < 1 || T < 1 || n_mix < 0) return 1;
    using U = const uint16_t*;
    using F = const float*;
    if (bf16)
        ln_mix_rows(B, T, C, U(x), U(w), U(b), U(prev), reinterpret_cast<const U*>(mixes), n_mix, eps, static_cast<uint16_t*>(last),
                    static_cast<uint16_t*>(out), threads);
    else
        ln_mix_rows(B, T, C, F(x), F(w), F(b), F(prev), reinterpret_cast<const F*>(mixes), n_mix, eps, static_cast<float*>(last),
                    static_cast<float*>(out), threads);
    return 0;
}

// See time_mix_core_rows; fp32 or (bf16 != 0) bf16 activations and vectors. Returns 0, or 1 (nothing
// computed) when the head size does not fit the kernel (a multiple of 16 up to 64).
int time_mix_core(const TimeMix* p, int64_t B, int64_t T, const void* r, const void* k, const void* v, const void* wl, const void* al,
                  const void* vl, const void* g, const void* v_first, const float* state_in, float* state_out, void* y, int bf16, int threads) {
    if (!fits(*p) || B < 0 || T < 0 || (v_first != nullptr && p->v0 == nullptr)) return 1;
    using U = const uint16_t*;
    using F = const float*;
    if (bf16)
        time_mix_core_rows(*p, B, T, U(r), U(k), U(v), U(wl), U(al), U(vl), U(g), U(v_first), state_in, state_out, static_cast<uint16_t*>(y), threads);
    else
        time_mix_core_rows(*p, B, T, F(r), F(k), F(v), F(wl), F(al), F(vl), F(g), F(v_first), state_in, state_out, static_cast<float*>(y), threads);
    return 0;
}

}  // extern "C"
