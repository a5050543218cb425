// The int4 row kernels of `project` (after cpu_rwkv7.cpp in the same translation unit: its Mat,
// Product, Input, over_tiles and store). Kept apart from the other formats' kernels so each can
// change alone.
//
// Layout (rwkvkit/quant.py, Int4Weight): a row is ceil(cols / 64) chunks of 64 columns, 32 bytes
// each, byte j holding column j (low nibble) and column j + 32 (high nibble) as code + 8, codes
// -7..7; columns past `cols` hold code 0. scale [rows, ceil(cols / group)]: one per `group`
// columns (a whole number of chunks), w = code * scale.
//
// With AVX512-VNNI, each chunk's nibbles widen to int16 (one zero-extension, a mask and a shift)
// and meet the input row's int16 steps (the int8 kernel's rounding, Input) in `vpdpwssd`: a group's
// integer sum is exact, converted once and scaled by its scale into an fp32 total per (row, input
// row). Each packed weight is read once for all the batch's rows, and a row's arithmetic is the same
// in any tile, so a sequence's result does not depend on its batch. Elsewhere: a portable loop on
// the fp32 input, one input row at a time.
namespace {

template <int NO, int NB>
__attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline)) inline void i4_block(const Product& p, const int16_t* x, const float* step,
                                                                                          int64_t b0, int64_t o) {
    const Mat& m = *p.m;
    const int64_t stride = i4_padded(m.cols), per_group = m.group / 64, groups = (m.cols + m.group - 1) / m.group;
    const uint8_t* qr = static_cast<const uint8_t*>(m.w) + o * (stride / 2);
    const float* sr = m.scale + o * groups;
    const __m512i nibble = _mm512_set1_epi16(15), eight = _mm512_set1_epi16(8);
    __m512 total[NO][NB];
    for (int r = 0; r < NO; ++r)
        for (int b = 0; b < NB; ++b) total[r][b] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
        __m512i acc[NO][NB];
        for (int r = 0; r < NO; ++r)
            for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_si512();
        const int64_t end = std::min(stride, (g + 1) * per_group * 64);
        for (int64_t c = g * per_group * 64; c < end; c += 64) {
            __m512i lo16[NO], hi16[NO];
            for (int r = 0; r < NO; ++r) {
                const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qr + r * (stride / 2) + c / 2)));
                lo16[r] = _mm512_sub_epi16(_mm512_and_si512(bytes, nibble), eight);
                hi16[r] = _mm512_sub_epi16(_mm512_srli_epi16(bytes, 4), eight);
            }
            for (int b = 0; b < NB; ++b) {
                const __m512i xl = _mm512_loadu_si512(x + b * stride + c), xh = _mm512_loadu_si512(x + b * stride + c + 32);
                for (int r = 0; r < NO; ++r) acc[r][b] = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(acc[r][b], lo16[r], xl), hi16[r], xh);
            }
        }
        for (int r = 0; r < NO; ++r) {
            const __m512 s = _mm512_set1_ps(sr[r * groups + g]);
            for (int b = 0; b < NB; ++b) total[r][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][b]), s, total[r][b]);
        }
    }
    for (int r = 0; r < NO; ++r)
        for (int b = 0; b < NB; ++b) store(p, b0 + b, o + r, _mm512_reduce_add_ps(total[r][b]) * step[b0 + b]);
}

template <int NB>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void rows_i4_vnni(const Product& p, const int16_t* x, const float* step, int64_t b0, int64_t lo,
                                                                       int64_t hi) {
    x += b0 * i4_padded(p.m->cols);
    int64_t o = lo;
    for (; NB > 1 && o + 2 <= hi; o += 2) i4_block<2, NB>(p, x, step, b0, o);
    for (; o < hi; ++o) i4_block<1, NB>(p, x, step, b0, o);
}

// Input row b against weight rows [lo, hi), in fp32.
void rows_i4_portable(const Product& p, int64_t b, int64_t lo, int64_t hi) {
    const Mat& m = *p.m;
    const int64_t half = i4_padded(m.cols) / 2, groups = (m.cols + m.group - 1) / m.group;
    const float* x = p.x + b * m.cols;
    for (int64_t o = lo; o < hi; ++o) {
        const uint8_t* q = static_cast<const uint8_t*>(m.w) + o * half;
        float sum = 0.f;
        for (int64_t g = 0; g < groups; ++g) {
            float part = 0.f;
            for (int64_t c = g * m.group; c < std::min(m.cols, (g + 1) * m.group); ++c) {
                const uint8_t byte = q[c / 64 * 32 + c % 32];
                part += float(int((c % 64 < 32) ? (byte & 15) : (byte >> 4)) - 8) * x[c];
            }
            sum += part * m.scale[o * groups + g];
        }
        store(p, b, o, sum);
    }
}

void rows_i4(const Product& p, const Input& in, int64_t lo, int64_t hi) {
    if (has_vnni())
        over_tiles<4>(p.n, lo, hi, [&](auto nb, int64_t b0, int64_t o0, int64_t o1) { rows_i4_vnni<nb.value>(p, in.i16.data(), in.step.data(), b0, o0, o1); });
    else
        for (int64_t b = 0; b < p.n; ++b) rows_i4_portable(p, b, lo, hi);
}

}  // namespace

extern "C" {

// out [rows, cols] = the weight m stands for, in fp32 or (bf16 != 0) bf16 rounded to nearest even:
// the int4 prefill GEMM's operand. Rows split over the threads. Returns 0, or 1 (nothing written)
// for a matrix that is not int4.
int dequantize_i4(const Mat* m, void* out, int bf16, int threads) {
    if (m == nullptr || !valid(*m) || m->format != I4) return 1;
    const int64_t cols = m->cols, half = i4_padded(cols) / 2, groups = (cols + m->group - 1) / m->group;
    parallel(m->rows * cols >= (1 << 16), threads, [&](int64_t tid, int64_t nth) {
        std::vector<float> row(i4_padded(cols));
        for (int64_t o = m->rows * tid / nth; o < m->rows * (tid + 1) / nth; ++o) {
            const uint8_t* q = static_cast<const uint8_t*>(m->w) + o * half;
            const float* s = m->scale + o * groups;
            for (int64_t c = 0; c < int64_t(row.size()); c += 64) {  // a chunk starts before cols, inside one group
                const float scale = s[c / m->group];
                const uint8_t* chunk = q + c / 2;
                float* r = row.data() + c;
                for (int64_t j = 0; j < 32; ++j) {
                    r[j] = float(int(chunk[j] & 15) - 8) * scale;
                    r[32 + j] = float(int(chunk[j] >> 4) - 8) * scale;
                }
            }
            if (bf16) {
                uint16_t* y = static_cast<uint16_t*>(out) + o * cols;
                int64_t c = 0;
                for (; c + kLanes <= cols; c += kLanes) vstore(y + c, vload(row.data() + c));
                for (; c < cols; ++c) y[c] = to_bf16(row[c]);
            } else {
                std::memcpy(static_cast<float*>(out) + o * cols, row.data(), sizeof(float) * cols);
            }
        }
    });
    return 0;
}

}  // extern "C"
