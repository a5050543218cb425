// ChatRWKV's top-p cutoff (plugins/samplers.py, nucleus_keep) for rows of float32 probabilities
// (after cpu_rwkv7.cpp in the same translation unit: `reused`). ChatRWKV sorts a row descending,
// takes numpy's float32 running sum in that order and cuts at the first value where the sum
// reaches top_p. The sum's rounding depends on the order of every term before the cut, so the
// prefix must be sorted; where the model is unsure the cut lies tens of thousands of tokens down
// and numpy's sort of a 65,536-token row took ~1.5 ms. Floats order as their bit patterns once
// mapped to unsigned keys, so a least-significant-digit radix sort (3 passes of 11 bits) orders a
// row in a few linear passes instead; the running sum then adds the same values in the same
// order, in float32, as numpy's cumsum.
namespace {

constexpr int kDigitBits = 11, kDigits = 1 << kDigitBits, kPasses = 3;

// Ascending float order as unsigned order: flip every bit of a negative, the sign bit of the rest.
inline uint32_t order_key(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    return bits & 0x80000000u ? ~bits : bits | 0x80000000u;
}

inline float key_value(uint32_t key) {
    const uint32_t bits = key & 0x80000000u ? key & 0x7fffffffu : ~key;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

struct SortKeys {};
struct SortSpare {};

// `row`'s values as sorted keys, ascending (in a thread-local buffer)
const uint32_t* sorted_keys(const float* row, int64_t n) {
    uint32_t* keys = reused<uint32_t, SortKeys>(n);
    uint32_t* spare = reused<uint32_t, SortSpare>(n);
    int64_t counts[kPasses][kDigits] = {};
    for (int64_t i = 0; i < n; ++i) {
        const uint32_t key = order_key(row[i]);
        keys[i] = key;
        for (int p = 0; p < kPasses; ++p) ++counts[p][(key >> (p * kDigitBits)) & (kDigits - 1)];
    }
    for (int p = 0; p < kPasses; ++p) {
        int64_t start = 0;
        for (int64_t& c : counts[p]) {
            const int64_t here = c;
            c = start;
            start += here;
        }
        const int shift = p * kDigitBits;
        for (int64_t i = 0; i < n; ++i) spare[counts[p][(keys[i] >> shift) & (kDigits - 1)]++] = keys[i];
        std::swap(keys, spare);
    }
    return keys;
}

}  // namespace

extern "C" {

// out[r] = the value of row r's token where the descending float32 running sum first reaches
// top_p (numpy compares float32 sums with float32(top_p)), or 0 where it never does.
void nucleus_cutoffs(int64_t rows, int64_t vocab, const float* probs, float top_p, float* out) {
    for (int64_t r = 0; r < rows; ++r) {
        const uint32_t* keys = sorted_keys(probs + r * vocab, vocab);
        float sum = 0.0f, cut = 0.0f;
        for (int64_t i = vocab - 1; i >= 0; --i) {
            const float value = key_value(keys[i]);
            sum += value;
            if (sum >= top_p) {
                cut = value;
                break;
            }
        }
        out[r] = cut;
    }
}

}  // extern "C"
