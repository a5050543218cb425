// A stage's RWKV-7 blocks for one token of each of B sequences (decode) in one native call (after
// cpu_rwkv7.cpp and cpu_mix.cpp in the same translation unit). Decode reads every weight once per
// step for all B rows; running the ops from Python also pays ~10 calls per layer, which this
// removes. It is composed of exactly the functions the op entry points call (ln_mix_rows,
// project_products, lora_products, time_mix_core_rows), in the order rwkvkit/models/rwkv7.py's
// `block` calls the ops, with fp32 activations throughout; the tests hold each op to its torch
// default and this composition to the Python sequence.
namespace {

// A block's weights as decode_layers reads them, with the constants they were prepared with
// (rwkvkit/native/cpu.py builds it once per block at load and mirrors it; layer_layout checks the mirror).
struct Layer {
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;  // fp32 [C], as every vector here (tm's too)
    const float* att_mixes[6];                  // fp32 [C] each, in the order of the model's Constants.att_mixes
    const float* ffn_mix;
    LoraPair w, a, g, v;  // the decay, rate, gate and value-residual LoRAs (v unused in the model's first layer)
    Mat R, K, V, O, FK, FV;
    TimeMix tm;
    int64_t C, F;
    float ln_eps;
};

bool fits(const Mat& m, int64_t rows, int64_t cols) { return valid(m) && m.rows == rows && m.cols == cols; }
bool fits(const LoraPair& p, int64_t C) { return valid(p) && p.in == C && p.out == C; }

// Whether decode_layer may read `L` with `C` channels (with the value residual's LoRA when `residual`)
bool fits(const Layer& L, int64_t C, bool residual) {
    const int64_t F = L.F;
    return L.C == C && fits(L.tm) && L.tm.H * L.tm.N == C && fits(L.R, C, C) && fits(L.K, C, C) && fits(L.V, C, C) && fits(L.O, C, C) &&
           fits(L.FK, F, C) && fits(L.FV, C, F) && fits(L.w, C) && fits(L.a, C) && fits(L.g, C) &&
           (!residual || (fits(L.v, C) && L.tm.v0 != nullptr));
}

// rwkv7.block for one token of B sequences. x [B, C] in/out (the residual stream); v_first [B, C]
// written when !residual (the model's first layer), read otherwise; the state ([B, C] and
// [B, H, N, N]) is read from *_in and written to *_out (distinct buffers: the caller's state is
// never modified).
void decode_layer(const Layer* L, int64_t B, bool residual, float* x, float* v_first, const float* att_x_in, float* att_x_out,
                  const float* kv_in, float* kv_out, const float* ffn_x_in, float* ffn_x_out, int threads) {
    const int64_t C = B * L->C;  // one [B, C] activation
    struct Activations;
    float *mixed = reused<float, Activations>(C * 13 + B * L->F), *r = mixed + 6 * C, *k = r + C, *v = k + C, *lw = v + C, *la = lw + C, *g = la + C, *lv = g + C;
    float* hidden = lv + C;

    // ---- rwkv7.time_mix. The positional contract of its ln_mix output: mixed[0] feeds R, [1] the
    // decay LoRA, [2] K, [3] V and the value-residual LoRA, [4] the rate LoRA, [5] the gate LoRA.
    float* m[6];
    for (int i = 0; i < 6; ++i) m[i] = mixed + i * C;
    ln_mix_rows<float>(B, 1, L->C, x, L->ln1_w, L->ln1_b, att_x_in, L->att_mixes, 6, L->ln_eps, att_x_out, mixed, threads);
    const Product rkv[3] = {{&L->R, m[0], r, nullptr, B, NONE}, {&L->K, m[2], k, nullptr, B, NONE}, {&L->V, m[3], v, nullptr, B, NONE}};
    project_products(rkv, 3, threads);
    const LoraJob loras[4] = {{&L->w, m[1], lw, B, TANH}, {&L->a, m[4], la, B, NONE}, {&L->g, m[5], g, B, SIGMOID}, {&L->v, m[3], lv, B, NONE}};
    lora_products(loras, residual ? 4 : 3, threads);
    float* y = mixed;  // the mixes are spent
    time_mix_core_rows<float>(L->tm, B, 1, r, k, v, lw, la, residual ? lv : nullptr, g, residual ? v_first : nullptr, kv_in, kv_out, y, threads);
    if (!residual) std::memcpy(v_first, v, sizeof(float) * C);
    const Product out = {&L->O, y, x, x, B, NONE};  // x += O y
    project_products(&out, 1, threads);

    // ---- rwkv7.channel_mix
    float* xk = mixed;
    ln_mix_rows<float>(B, 1, L->C, x, L->ln2_w, L->ln2_b, ffn_x_in, &L->ffn_mix, 1, L->ln_eps, ffn_x_out, xk, threads);
    const Product key = {&L->FK, xk, hidden, nullptr, B, RELU_SQUARE};
    project_products(&key, 1, threads);
    const Product value = {&L->FV, hidden, x, x, B, NONE};  // x += FV relu(FK xk)^2
    project_products(&value, 1, threads);
}

// The table a decode step's tokens are looked up in: [rows, cols] fp32 or bf16 rows, or int8 rows
// with one fp32 scale each (rwkvkit/native/cpu.py mirrors it).
struct Embedding {
    const void* w;
    const float* scale;  // int8 only
    int64_t rows, cols;
    int32_t format;
};

// x [B, C] = the rows of `ids` as the backend's embed gives them in the activation dtype (bf16:
// rounded there, an int8 row's code times its scale each rounded first, as the torch ops round),
// widened to fp32. Returns false for an id outside the table.
bool gather_rows(const Embedding& e, const int64_t* ids, int64_t B, bool bf16, float* x) {
    const int64_t C = e.cols;
    for (int64_t b = 0; b < B; ++b)
        if (ids[b] < 0 || ids[b] >= e.rows) return false;
    for (int64_t b = 0; b < B; ++b) {
        const int64_t row = ids[b] * C;
        float* out = x + b * C;
        if (e.format == I8) {
            const int8_t* q = static_cast<const int8_t*>(e.w) + row;
            const float scale = bf16 ? bf16_to_f32(to_bf16(e.scale[ids[b]])) : e.scale[ids[b]];
            for (int64_t c = 0; c < C; ++c) out[c] = bf16 ? bf16_to_f32(to_bf16(float(q[c]) * scale)) : float(q[c]) * scale;
        } else if (e.format == BF16) {
            for (int64_t c = 0; c < C; ++c) out[c] = bf16_to_f32(static_cast<const uint16_t*>(e.w)[row + c]);
        } else {
            std::memcpy(out, static_cast<const float*>(e.w) + row, sizeof(float) * C);
        }
    }
    return true;
}

// The rows rounded to bf16 in place (what converting them to a bf16 placement's dtype does)
void round_bf16(float* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) x[i] = bf16_to_f32(to_bf16(x[i]));
}

}  // namespace

extern "C" {

// The layout Python's ctypes mirrors must have (rwkvkit/native/cpu.py checks it at load): the
// structs' sizes, then offsets of fields spread over Layer and TimeMix. Writes at most n values;
// returns how many there are.
int64_t layer_layout(int64_t* out, int64_t n) {
    const int64_t values[] = {
        sizeof(Mat),        sizeof(Product),        sizeof(LoraPair),           sizeof(LoraJob),    sizeof(TimeMix),
        sizeof(Layer),      offsetof(Layer, att_mixes), offsetof(Layer, w),     offsetof(Layer, R), offsetof(Layer, tm),
        offsetof(Layer, C), offsetof(Layer, ln_eps), offsetof(TimeMix, H),      offsetof(TimeMix, kk_eps), offsetof(Product, n),
        offsetof(LoraJob, n), sizeof(Embedding), offsetof(Embedding, format),
    };
    const int64_t count = sizeof values / sizeof values[0];
    std::memcpy(out, values, sizeof(int64_t) * std::min(std::max(n, int64_t(0)), count));
    return count;
}

// A stage's n layers for one token of each of B sequences, in order. att_in[i] / ffn_in[i] point at
// layer i's token shifts [B, C], fp32, or bf16 when shifts_bf16 (a bf16 placement's state); att_out
// / ffn_out are fp32 [n, B, C] (layer i at row i), kv_out [n, B, H*N*N]; kv_in holds each layer's
// [B, H, N, N] state pointer. x [B, C] in/out; v_first [B, C] read when has_v_first, else written
// by the first layer (the model's first). Returns 0, or 1 (nothing computed) when a layer's
// dimensions or weights do not fit.
int decode_layers(int64_t n, const Layer* const* layers, int64_t B, int has_v_first, float* x, float* v_first, const void* const* att_in,
                  const float* const* kv_in, const void* const* ffn_in, int shifts_bf16, float* att_out, float* kv_out, float* ffn_out, int threads) {
    if (n < 1 || B < 1) return n < 0 || B < 0;
    const PoolScope scope;
    const int64_t C = layers[0]->C, S = B * C * layers[0]->tm.N, X = B * C;
    for (int64_t i = 0; i < n; ++i)
        if (!fits(*layers[i], C, has_v_first || i > 0) || layers[i]->tm.N != layers[0]->tm.N) return 1;
    struct Shifts;
    float* widened = reused<float, Shifts>(shifts_bf16 ? 2 * X : 0);  // a bf16 layer's shifts, as fp32
    for (int64_t i = 0; i < n; ++i) {
        const float *att = static_cast<const float*>(att_in[i]), *ffn = static_cast<const float*>(ffn_in[i]);
        if (shifts_bf16) {
            for (int64_t j = 0; j < X; ++j) {
                widened[j] = bf16_to_f32(static_cast<const uint16_t*>(att_in[i])[j]);
                widened[X + j] = bf16_to_f32(static_cast<const uint16_t*>(ffn_in[i])[j]);
            }
            att = widened, ffn = widened + X;
        }
        decode_layer(layers[i], B, has_v_first || i > 0, x, v_first, att, att_out + i * X, kv_in[i], kv_out + i * S, ffn, ffn_out + i * X, threads);
    }
    return 0;
}


// One decode step of a whole model on one stage, for one token of each of B sequences: the
// embedding lookup, decode_layers, the final layer norm (ln_w, ln_b in the activation dtype,
// eps) and the head (a Mat of any format) into fp32 logits [B, head.rows], each step as the op
// by op path rounds it (bf16: the embedding, the residual stream after the last layer, the
// normed rows and the logits). The states as decode_layers takes them. Returns 0; 1 (nothing
// written) for dimensions that do not fit; 2 for an id outside the embedding.
int decode_model(int64_t n, const Layer* const* layers, const Embedding* emb, const int64_t* ids, int64_t B, const void* ln_w, const void* ln_b,
                 float ln_eps, const Mat* head, int bf16, const void* const* att_in, const float* const* kv_in, const void* const* ffn_in,
                 float* att_out, float* kv_out, float* ffn_out, float* logits, int threads) {
    if (n < 1 || B < 1 || emb == nullptr || head == nullptr || ids == nullptr) return 1;
    const int64_t C = layers[0]->C;
    if (emb->cols != C || emb->rows < 1 || (emb->format == I8 && emb->scale == nullptr) || !valid(*head) || head->cols != C || C % kLanes ||
        (emb->format != F32 && emb->format != BF16 && emb->format != I8))
        return 1;
    struct Rows;
    float* x = reused<float, Rows>(3 * B * C);  // the residual stream, v_first, the normed rows
    if (!gather_rows(*emb, ids, B, bf16, x)) return 2;
    const int status = decode_layers(n, layers, B, 0, x, x + B * C, att_in, kv_in, ffn_in, bf16, att_out, kv_out, ffn_out, threads);
    if (status) return status;
    float* normed = x + 2 * B * C;
    if (bf16) {  // the residual stream as bf16 (what the op path hands the head), then normed
        struct Row;
        uint16_t* row = reused<uint16_t, Row>(C);
        for (int64_t r = 0; r < B; ++r) {
            for (int64_t c = 0; c < C; ++c) row[c] = to_bf16(x[r * C + c]);
            norm_row(row, static_cast<const uint16_t*>(ln_w), static_cast<const uint16_t*>(ln_b), C, ln_eps, normed + r * C);
        }
        round_bf16(normed, B * C);
    } else {
        for (int64_t r = 0; r < B; ++r) norm_row(x + r * C, static_cast<const float*>(ln_w), static_cast<const float*>(ln_b), C, ln_eps, normed + r * C);
    }
    const PoolScope scope;
    const Product out = {head, normed, logits, nullptr, B, NONE};
    project_products(&out, 1, threads);
    if (bf16) round_bf16(logits, B * head->rows);
    return 0;
}

}  // extern "C"
