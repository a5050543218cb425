// Matrix-vector products for decoding, several per launch:
//
//   y_g[m][o] = epilogue_g(scale_g[o] * sum_i W_g[o][i] x_g[m][i])  (+ residual[m][o] for a single product)
//
// for m < rows <= kMaxMatvecRows and up to kMaxMatvecGroup products g. Decoding reads every weight
// once per token, so the kernel is a stream over W: one warp per output row, each lane loading 16
// weight bytes at a time and reusing them for every activation row; accumulation in float. W is
// int8 with per-row float scales, or stored in the activation dtype. One launch serves a whole
// group (a layer's receptance, key and value projections and its LoRA down-projections) because
// a small model's decode step is bound by kernel launches, not by bandwidth.
#include <cstdint>

#include "cuda_dtypes.h"
#include "rwkvkit_cuda.h"

namespace rwkvkit {
namespace {

constexpr int kWarps = 4;   // output rows per block
constexpr int kBytes = 16;  // weight bytes per lane per step: one 16-byte load

// Four int8 in a word -> four floats without the slow integer-to-float conversion: a byte b + 128
// placed in the low mantissa bits of 2^23 reads as exactly 2^23 + b + 128, so one byte permute and
// one subtraction give b.
__device__ __forceinline__ void int8x4_to_float(uint32_t word, float* out) {
  const uint32_t biased = word ^ 0x80808080u;  // each signed byte b -> unsigned b + 128
#pragma unroll
  for (int i = 0; i < 4; ++i) out[i] = __uint_as_float(__byte_perm(biased, 0x4B000000u, 0x7440u | i)) - 8388736.f;
}

// n consecutive values (n * sizeof(value) a multiple of 16 bytes, 16-byte aligned) as floats.
template <int n>
__device__ __forceinline__ void load_floats(const int8_t* p, float* out) {
#pragma unroll
  for (int i = 0; i < n / 16; ++i) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p) + i);
    int8x4_to_float(v.x, out + 16 * i), int8x4_to_float(v.y, out + 16 * i + 4);
    int8x4_to_float(v.z, out + 16 * i + 8), int8x4_to_float(v.w, out + 16 * i + 12);
  }
}
template <int n>
__device__ __forceinline__ void load_floats(const float* p, float* out) {
#pragma unroll
  for (int i = 0; i < n / 4; ++i) {
    const float4 v = reinterpret_cast<const float4*>(p)[i];
    out[4 * i] = v.x, out[4 * i + 1] = v.y, out[4 * i + 2] = v.z, out[4 * i + 3] = v.w;
  }
}
template <int n, typename Pair, typename Convert>
__device__ __forceinline__ void load_pairs(const void* p, float* out, Convert convert) {
#pragma unroll
  for (int i = 0; i < n / 8; ++i) {
    const uint4 v = reinterpret_cast<const uint4*>(p)[i];
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = convert(*reinterpret_cast<const Pair*>(&words[j]));
      out[8 * i + 2 * j] = f.x, out[8 * i + 2 * j + 1] = f.y;
    }
  }
}
template <int n>
__device__ __forceinline__ void load_floats(const __half* p, float* out) {
  load_pairs<n, __half2>(p, out, [](__half2 h) { return __half22float2(h); });
}
template <int n>
__device__ __forceinline__ void load_floats(const __nv_bfloat16* p, float* out) {
  load_pairs<n, __nv_bfloat162>(p, out, [](__nv_bfloat162 h) { return __bfloat1622float2(h); });
}

// acc[m] += this lane's share of W[o] . x[m], W's row stored as Weight.
template <typename T, typename Weight, int M>
__device__ __forceinline__ void row_dot(const Weight* __restrict__ w_row, const T* __restrict__ x, int n_in, int lane, float (&acc)[M]) {
  constexpr int E = kBytes / sizeof(Weight);  // weights per lane per step
#pragma unroll 4
  for (int i = lane * E; i < n_in; i += 32 * E) {
    float w[E];
    load_floats<E>(w_row + i, w);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float xs[E];
      load_floats<E>(x + size_t(m) * n_in + i, xs);
#pragma unroll
      for (int e = 0; e < E; ++e) acc[m] = fmaf(w[e], xs[e], acc[m]);
    }
  }
}

__device__ __forceinline__ float apply(Epilogue epilogue, float v) {
  switch (epilogue) {
    case Epilogue::tanh: return tanhf(v);
    case Epilogue::sigmoid: return sigmoid(v);
    case Epilogue::relu_square: return v > 0.f ? v * v : 0.f;
    default: return v;
  }
}

// __grid_constant__: the group is read in place from parameter space even with a runtime index
// (a plain by-value parameter indexed at run time is copied to local memory first).
template <typename T, int M>
__global__ void __launch_bounds__(kWarps * 32) matvec_kernel(const __grid_constant__ MatvecGroup group) {
  const int lane = threadIdx.x % 32;
  int o = blockIdx.x * kWarps + threadIdx.x / 32;  // this warp's row, counted over the group's outputs
  int g = 0;
  while (g < group.count && o >= group.op[g].n_out) o -= group.op[g++].n_out;
  if (g == group.count) return;  // whole warps leave together
  const MatvecOperand& op = group.op[g];
  const T* x = static_cast<const T*>(op.x);
  float acc[M] = {};
  if (op.scale != nullptr) {
    row_dot<T, int8_t, M>(static_cast<const int8_t*>(op.w) + size_t(o) * op.n_in, x, op.n_in, lane, acc);
  } else {
    row_dot<T, T, M>(static_cast<const T*>(op.w) + size_t(o) * op.n_in, x, op.n_in, lane, acc);
  }
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = group_sum<32>(acc[m]);
  if (lane == 0) {
    const float s = op.scale != nullptr ? op.scale[o] : 1.f;
    const T* residual = static_cast<const T*>(group.residual);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const size_t at = size_t(m) * op.n_out + o;
      float v = apply(static_cast<Epilogue>(op.epilogue), acc[m] * s);
      if (residual != nullptr) v += to_float(residual[at]);
      static_cast<T*>(op.y)[at] = from_float<T>(v);
    }
  }
}

template <typename T, int M = 1>
cudaError_t launch(int rows, const MatvecGroup& group, cudaStream_t stream) {
  if constexpr (M < kMaxMatvecRows) {
    if (rows > M) return launch<T, M + 1>(rows, group, stream);
  }
  if (rows != M) return cudaErrorInvalidValue;
  int total = 0;
  for (int g = 0; g < group.count; ++g) total += group.op[g].n_out;
  if (total == 0) return cudaSuccess;
  matvec_kernel<T, M><<<(total + kWarps - 1) / kWarps, kWarps * 32, 0, stream>>>(group);
  return cudaGetLastError();
}

}  // namespace

cudaError_t matvec(Dtype dtype, int rows, const MatvecGroup& group, cudaStream_t stream) {
  if (rows < 1 || group.count < 1 || group.count > kMaxMatvecGroup) return cudaErrorInvalidValue;
  switch (dtype) {
    case Dtype::f32: return launch<float>(rows, group, stream);
    case Dtype::f16: return launch<__half>(rows, group, stream);
    case Dtype::bf16: return launch<__nv_bfloat16>(rows, group, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace rwkvkit
