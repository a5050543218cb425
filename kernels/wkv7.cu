// WKV-7 forward scan with carried state, written from the recurrence (per batch b, head h and
// token t; i is the value index, j the key index, N = 64):
//
//   sa      = sum_l kv[i][l] kk[l]                       (the state's "removal" read-out)
//   kv[i][j] = kv[i][j] w[j] - sa (kk[j] a[j]) + v[i] k[j]
//   y[i]    = sum_j kv[i][j] r[j]
//
// Row i of the state only ever reads itself, so rows are independent: a block scans kRows rows
// of one head (two blocks per head, which doubles the blocks a batch-1 prefill can spread over
// the GPU). kSplit consecutive threads share a row, each holding N / kSplit of its columns in
// registers; the two row sums finish with warp shuffles. The per-token vectors (r, w, k, kk,
// kk*a, v) are staged in shared memory kChunk tokens at a time, the next chunk being loaded into
// registers while the current one is scanned, so global-memory latency stays off the serial path.
#include "cuda_dtypes.h"
#include "rwkvkit_cuda.h"

namespace rwkvkit {
namespace {

constexpr int N = kHeadSize;
constexpr int kSplit = 4;                         // threads per state row
constexpr int kRows = 32;                         // state rows per block
constexpr int kThreads = kRows * kSplit;          // 128
constexpr int kChunk = 16;                        // tokens staged in shared memory at a time
constexpr int kGroups = N / 4 / kSplit;           // float4 column groups a thread owns
constexpr int kLoads = kChunk * N / kThreads;     // elements per thread, per input, per chunk
static_assert(N % (4 * kSplit) == 0 && N % kRows == 0 && (kChunk * N) % kThreads == 0, "tile shape");

// Shared memory for one chunk: vectors over the key index j (float4-aligned), v over i, y out.
struct Stage {
  alignas(16) float r[kChunk][N];
  alignas(16) float w[kChunk][N];
  alignas(16) float k[kChunk][N];
  alignas(16) float kk[kChunk][N];
  alignas(16) float b[kChunk][N];  // kk * a
  float v[kChunk][N];
  float y[kChunk][kRows];
};

template <typename T>
struct Inputs {
  const T *r, *k, *v, *kk, *a;
  const float* w;
};

// One chunk of inputs in registers: element e = threadIdx.x + u * kThreads of the chunk's
// [kChunk, N] tile (token e / N, channel e % N), so each token's loads are coalesced.
template <typename T>
struct Chunk {
  T r[kLoads], k[kLoads], v[kLoads], kk[kLoads], a[kLoads];
  float w[kLoads];

  __device__ __forceinline__ void load(const Inputs<T>& in, size_t base, size_t token_stride, int t0, int T_len) {
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const int e = threadIdx.x + u * kThreads, t = t0 + e / N;
      if (t < T_len) {
        const size_t idx = base + t * token_stride + e % N;
        r[u] = in.r[idx], k[u] = in.k[idx], v[u] = in.v[idx], kk[u] = in.kk[idx], a[u] = in.a[idx], w[u] = in.w[idx];
      } else {  // past the last token: staged but never read; zeros rather than indeterminate values
        r[u] = k[u] = v[u] = kk[u] = a[u] = from_float<T>(0.f), w[u] = 0.f;
      }
    }
  }

  __device__ __forceinline__ void store(Stage& s) const {
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const int e = threadIdx.x + u * kThreads, t = e / N, c = e % N;
      const float kk_f = to_float(kk[u]);
      s.r[t][c] = to_float(r[u]), s.w[t][c] = w[u], s.k[t][c] = to_float(k[u]), s.kk[t][c] = kk_f;
      s.b[t][c] = kk_f * to_float(a[u]), s.v[t][c] = to_float(v[u]);
    }
  }
};

__device__ __forceinline__ float4 vec4(const float (&row)[N], int group) { return reinterpret_cast<const float4*>(row)[group]; }

// Pairwise sum of the per-group partial dot products: dependency depth log2(kGroups) instead of a
// chain through every column (the compiler may not reassociate float additions itself).
__device__ __forceinline__ float tree_sum(float (&x)[kGroups]) {
#pragma unroll
  for (int width = kGroups / 2; width > 0; width /= 2)
#pragma unroll
    for (int i = 0; i < width; ++i) x[i] += x[i + width];
  return x[0];
}

template <typename T>
__global__ void __launch_bounds__(kThreads) wkv7_kernel(int T_len, int H, Inputs<T> in, const float* __restrict__ kv_in,
                                                        float* __restrict__ kv_out, T* __restrict__ y) {
  __shared__ Stage s;
  const int bh = blockIdx.x, b = bh / H, h = bh % H;  // bh = b * H + h
  const int row0 = blockIdx.y * kRows, local_row = threadIdx.x / kSplit, row = row0 + local_row;
  const int part = threadIdx.x % kSplit;            // this thread's columns: float4 groups part, part + kSplit, ...
  const size_t token_stride = size_t(H) * N;
  const size_t base = (size_t(b) * T_len * H + h) * N;  // channel 0 of token 0 of (b, h)

  const size_t state_row = (size_t(bh) * N + row) * N;
  float4 st[kGroups];
#pragma unroll
  for (int g = 0; g < kGroups; ++g) st[g] = reinterpret_cast<const float4*>(kv_in + state_row)[g * kSplit + part];

  Chunk<T> next;
  next.load(in, base, token_stride, 0, T_len);
  for (int t0 = 0; t0 < T_len; t0 += kChunk) {
    next.store(s);
    __syncthreads();
    if (t0 + kChunk < T_len) next.load(in, base, token_stride, t0 + kChunk, T_len);  // in flight during the scan
    const int n = min(kChunk, T_len - t0);
    for (int t = 0; t < n; ++t) {
      float partial[kGroups];
#pragma unroll
      for (int g = 0; g < kGroups; ++g) partial[g] = dot4(st[g], vec4(s.kk[t], g * kSplit + part));
      const float sa = group_sum<kSplit>(tree_sum(partial));
      const float vi = s.v[t][row];
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        const int j = g * kSplit + part;
        const float4 w = vec4(s.w[t], j), bb = vec4(s.b[t], j), k = vec4(s.k[t], j);
        st[g].x = fmaf(st[g].x, w.x, fmaf(-sa, bb.x, vi * k.x));
        st[g].y = fmaf(st[g].y, w.y, fmaf(-sa, bb.y, vi * k.y));
        st[g].z = fmaf(st[g].z, w.z, fmaf(-sa, bb.z, vi * k.z));
        st[g].w = fmaf(st[g].w, w.w, fmaf(-sa, bb.w, vi * k.w));
        partial[g] = dot4(st[g], vec4(s.r[t], j));
      }
      const float yi = group_sum<kSplit>(tree_sum(partial));
      if (part == 0) s.y[t][local_row] = yi;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < n * kRows; e += kThreads) {
      const int t = e / kRows, c = e % kRows;
      y[base + (t0 + t) * token_stride + row0 + c] = from_float<T>(s.y[t][c]);
    }
    // the next iteration's store() overwrites s only after every thread passed the barrier above,
    // and s.y only after the barrier that follows it
  }
#pragma unroll
  for (int g = 0; g < kGroups; ++g) reinterpret_cast<float4*>(kv_out + state_row)[g * kSplit + part] = st[g];
}

template <typename T>
cudaError_t launch(int B, int T_len, int H, const void* r, const float* w, const void* k, const void* v, const void* kk,
                   const void* a, const float* kv_in, float* kv_out, void* y, cudaStream_t stream) {
  const Inputs<T> in{static_cast<const T*>(r), static_cast<const T*>(k), static_cast<const T*>(v),
                     static_cast<const T*>(kk), static_cast<const T*>(a), w};
  wkv7_kernel<T><<<dim3(B * H, N / kRows), kThreads, 0, stream>>>(T_len, H, in, kv_in, kv_out, static_cast<T*>(y));
  return cudaGetLastError();
}

}  // namespace

cudaError_t wkv7_forward(Dtype dtype, int B, int T, int H, const void* r, const float* w, const void* k, const void* v,
                         const void* kk, const void* a, const float* kv_in, float* kv_out, void* y, cudaStream_t stream) {
  switch (dtype) {
    case Dtype::f32: return launch<float>(B, T, H, r, w, k, v, kk, a, kv_in, kv_out, y, stream);
    case Dtype::f16: return launch<__half>(B, T, H, r, w, k, v, kk, a, kv_in, kv_out, y, stream);
    case Dtype::bf16: return launch<__nv_bfloat16>(B, T, H, r, w, k, v, kk, a, kv_in, kv_out, y, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace rwkvkit
