// int8 weight-only matrix-vector product for decoding: y[m][o] = scale[o] * sum_i q[o][i] x[m][i]
// for a few activation rows m (one per sequence of the batch).
//
// Decoding reads every weight once per token, so the kernel is a stream over q: one warp per
// output channel, each lane loading 16 weight bytes at a time (one 16-byte load) and reusing
// them for every activation row; accumulation in float, one scale multiply at the end. x is small
// and read by every warp, so it stays in L1/L2.
#include <cstdint>

#include "cuda_dtypes.h"
#include "rwkvkit_cuda.h"

namespace rwkvkit {
namespace {

constexpr int kWarps = 4;         // output channels per block
constexpr int kPerLane = 16;      // weights per lane per step: one 16-byte load

// Four int8 in a word -> four floats without the slow integer-to-float conversion: a byte b + 128
// placed in the low mantissa bits of 2^23 reads as exactly 2^23 + b + 128, so one byte permute and
// one subtraction give b.
__device__ __forceinline__ void int8x4_to_float(uint32_t word, float* out) {
  const uint32_t biased = word ^ 0x80808080u;  // each signed byte b -> unsigned b + 128
#pragma unroll
  for (int i = 0; i < 4; ++i) out[i] = __uint_as_float(__byte_perm(biased, 0x4B000000u, 0x7440u | i)) - 8388736.f;
}

// 16 consecutive activations (16-byte aligned) as floats.
__device__ __forceinline__ void load16(const float* p, float* out) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float4 v = reinterpret_cast<const float4*>(p)[i];
    out[4 * i] = v.x, out[4 * i + 1] = v.y, out[4 * i + 2] = v.z, out[4 * i + 3] = v.w;
  }
}

template <typename Pair, typename Convert>
__device__ __forceinline__ void load16_pairs(const void* p, float* out, Convert convert) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const uint4 v = reinterpret_cast<const uint4*>(p)[i];
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = convert(*reinterpret_cast<const Pair*>(&words[j]));
      out[8 * i + 2 * j] = f.x, out[8 * i + 2 * j + 1] = f.y;
    }
  }
}
__device__ __forceinline__ void load16(const __half* p, float* out) {
  load16_pairs<__half2>(p, out, [](__half2 h) { return __half22float2(h); });
}
__device__ __forceinline__ void load16(const __nv_bfloat16* p, float* out) {
  load16_pairs<__nv_bfloat162>(p, out, [](__nv_bfloat162 h) { return __bfloat1622float2(h); });
}

template <typename T, int M>
__global__ void __launch_bounds__(kWarps * 32) int8_matvec_kernel(int n_in, int n_out, const T* __restrict__ x,
                                                                  const int8_t* __restrict__ q,
                                                                  const float* __restrict__ scale, T* __restrict__ y) {
  const int lane = threadIdx.x % 32, o = blockIdx.x * kWarps + threadIdx.x / 32;
  if (o >= n_out) return;  // whole warps leave together
  const int8_t* q_row = q + size_t(o) * n_in;
  float acc[M] = {};
#pragma unroll 4
  for (int i = lane * kPerLane; i < n_in; i += 32 * kPerLane) {
    const uint4 packed = __ldg(reinterpret_cast<const uint4*>(q_row + i));
    float w[kPerLane];
    int8x4_to_float(packed.x, w), int8x4_to_float(packed.y, w + 4), int8x4_to_float(packed.z, w + 8), int8x4_to_float(packed.w, w + 12);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float xs[kPerLane];
      load16(x + size_t(m) * n_in + i, xs);
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) acc[m] = fmaf(w[e], xs[e], acc[m]);
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = group_sum<32>(acc[m]);
  if (lane == 0) {
    const float s = scale[o];
#pragma unroll
    for (int m = 0; m < M; ++m) y[size_t(m) * n_out + o] = from_float<T>(acc[m] * s);
  }
}

template <typename T, int M = 1>
cudaError_t launch(int rows, int n_in, int n_out, const void* x, const int8_t* q, const float* scale, void* y,
                   cudaStream_t stream) {
  if constexpr (M < kMaxMatvecRows) {
    if (rows > M) return launch<T, M + 1>(rows, n_in, n_out, x, q, scale, y, stream);
  }
  if (rows != M) return cudaErrorInvalidValue;
  const int blocks = (n_out + kWarps - 1) / kWarps;
  int8_matvec_kernel<T, M><<<blocks, kWarps * 32, 0, stream>>>(n_in, n_out, static_cast<const T*>(x), q, scale, static_cast<T*>(y));
  return cudaGetLastError();
}

}  // namespace

cudaError_t int8_matvec(Dtype dtype, int rows, int n_in, int n_out, const void* x, const int8_t* q, const float* scale,
                        void* y, cudaStream_t stream) {
  if (rows < 1 || n_in % kPerLane != 0) return cudaErrorInvalidValue;
  switch (dtype) {
    case Dtype::f32: return launch<float>(rows, n_in, n_out, x, q, scale, y, stream);
    case Dtype::f16: return launch<__half>(rows, n_in, n_out, x, q, scale, y, stream);
    case Dtype::bf16: return launch<__nv_bfloat16>(rows, n_in, n_out, x, q, scale, y, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace rwkvkit
