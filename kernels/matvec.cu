// Matrix-vector products for decoding, several per launch:
//
//   y_g[m][o] = epilogue_g(scale_g[o] * sum_i W_g[o][i] x_g[m][i])  (+ residual[m][o] for a single product)
//
// for m < rows <= kMaxMatvecRows and up to kMaxMatvecGroup products g. Decoding reads every weight
// once per token, so the kernel is a stream over W and its speed is the bandwidth it reaches. W is
// int8 with per-row float scales, or stored in the activation dtype; either way every thread loads
// 16 weight bytes at a time (a "chunk": 16 int8, 8 fp16/bf16 or 4 fp32), kUnroll chunks in flight
// before it uses them, and reuses each chunk for every activation row; accumulation in float. One
// launch serves a whole group (a layer's receptance, key and value projections, its LoRA factors)
// because a small model's decode step is bound by kernel launches, not by bandwidth.
//
// A row's dot product is shared by a team of `Team` threads (a template argument), chosen per
// launch by team_for() from the shapes:
//   8    four rows per warp: short rows (the LoRA up-projections' rank-sized inputs), where a warp
//        per row would leave most lanes without a chunk;
//   32   a warp per row: enough rows to fill the GPU (R/K/V, the FFN key [4C, C], the head V x C);
//   128  split-K across the block's four warps, joined in shared memory: few long rows (the FFN
//        value [C, 4C], the output projection), where a warp per row leaves the SMs short of
//        loads in flight.
// Callers may force a team (tests cover each on every shape; the benchmark compares them).
#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>

#include "cuda_dtypes.h"
#include "rwkvkit_cuda.h"

namespace rwkvkit {
namespace {

constexpr int kThreads = 128;  // per block, for every team size
constexpr int kUnroll = 4;     // chunks each thread loads before using them
constexpr int kChunkBytes = 16;
// team_for()'s thresholds, in chunks per row and resident warps per SM
constexpr int kShortRow = 16;     // at most this many chunks: teams of 8 (each lane <= 2 chunks)
constexpr int kSplitRow = 128;    // at least this many: split-K may give each of 128 threads a chunk
constexpr int kWarpsPerSm = 32;   // fewer rows than this many warps per SM: split-K

// Four int8 in a word -> four floats without the slow integer-to-float conversion: a byte b + 128
// placed in the low mantissa bits of 2^23 reads as exactly 2^23 + b + 128, so one byte permute and
// one subtraction give b.
__device__ __forceinline__ void int8x4_to_float(uint32_t word, float* out) {
  const uint32_t biased = word ^ 0x80808080u;  // each signed byte b -> unsigned b + 128
#pragma unroll
  for (int i = 0; i < 4; ++i) out[i] = __uint_as_float(__byte_perm(biased, 0x4B000000u, 0x7440u | i)) - 8388736.f;
}

// One 16-byte chunk of values of type V as 16 / sizeof(V) floats.
__device__ __forceinline__ void chunk_to_float(uint4 v, const int8_t*, float* out) {
  int8x4_to_float(v.x, out), int8x4_to_float(v.y, out + 4), int8x4_to_float(v.z, out + 8), int8x4_to_float(v.w, out + 12);
}
__device__ __forceinline__ void chunk_to_float(uint4 v, const float*, float* out) {
  out[0] = __uint_as_float(v.x), out[1] = __uint_as_float(v.y), out[2] = __uint_as_float(v.z), out[3] = __uint_as_float(v.w);
}
template <typename Pair, typename Convert>
__device__ __forceinline__ void pairs_to_float(uint4 v, float* out, Convert convert) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 f = convert(*reinterpret_cast<const Pair*>(&words[j]));
    out[2 * j] = f.x, out[2 * j + 1] = f.y;
  }
}
__device__ __forceinline__ void chunk_to_float(uint4 v, const __half*, float* out) {
  pairs_to_float<__half2>(v, out, [](__half2 h) { return __half22float2(h); });
}
__device__ __forceinline__ void chunk_to_float(uint4 v, const __nv_bfloat16*, float* out) {
  pairs_to_float<__nv_bfloat162>(v, out, [](__nv_bfloat162 h) { return __bfloat1622float2(h); });
}

// acc[m] += W[o][c*E .. c*E+E) . x[m][same], for one chunk `raw` of the row; x (16-byte aligned
// rows) is read 16 bytes at a time too, each load used at once so few of its values stay live.
template <typename T, typename Weight, int M>
__device__ __forceinline__ void use_chunk(uint4 raw, int c, const T* __restrict__ x, int n_in, float (&acc)[M]) {
  constexpr int E = kChunkBytes / sizeof(Weight), XE = kChunkBytes / sizeof(T);  // values per weight / x load
  static_assert(E % XE == 0, "a weight chunk spans whole x loads");
  float w[E];
  chunk_to_float(raw, static_cast<const Weight*>(nullptr), w);
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const uint4* xm = reinterpret_cast<const uint4*>(x + size_t(m) * n_in + size_t(c) * E);
#pragma unroll
    for (int i = 0; i < E / XE; ++i) {
      float xs[XE];
      chunk_to_float(__ldg(xm + i), x, xs);
#pragma unroll
      for (int e = 0; e < XE; ++e) acc[m] = fmaf(w[i * XE + e], xs[e], acc[m]);
    }
  }
}

// acc[m] += this thread's share of W[o] . x[m]: chunks t, t + Team, t + 2 Team, ... of the row
// (n_in / E chunks; the binding checks n_in is a multiple of E). kUnroll chunks are loaded before
// any is used, so that many 16-byte loads per thread are in flight; the remainder goes one by one.
template <typename T, typename Weight, int M, int Team>
__device__ __forceinline__ void row_dot(const Weight* __restrict__ w_row, const T* __restrict__ x, int n_in, int t, float (&acc)[M]) {
  constexpr int E = kChunkBytes / sizeof(Weight);
  const uint4* w = reinterpret_cast<const uint4*>(w_row);
  const int chunks = n_in / E;
  int c = t;
  for (; c + (kUnroll - 1) * Team < chunks; c += kUnroll * Team) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) raw[u] = __ldg(w + c + u * Team);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) use_chunk<T, Weight, M>(raw[u], c + u * Team, x, n_in, acc);
  }
  for (; c < chunks; c += Team) use_chunk<T, Weight, M>(__ldg(w + c), c, x, n_in, acc);
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
// Threads of a team past the last row still run the shuffles and the barrier (with no chunks):
// with teams of 8, a warp can hold both, and every lane must reach a full-mask shuffle.
template <typename T, int M, int Team>
__global__ void __launch_bounds__(kThreads) matvec_kernel(const __grid_constant__ MatvecGroup group) {
  static_assert(Team == 8 || Team == 32 || Team == kThreads, "a team is part of a warp, a warp, or the block");
  constexpr int kLanes = Team < 32 ? Team : 32;   // a team's threads within one warp
  constexpr int kWarpsPerTeam = Team / kLanes;    // 4 for split-K, else 1
  const int t = threadIdx.x % Team;               // this thread's place in its team
  int o = blockIdx.x * (kThreads / Team) + threadIdx.x / Team;  // the team's row, counted over the group's outputs
  int g = 0;
  while (g < group.count && o >= group.op[g].n_out) o -= group.op[g++].n_out;
  const bool valid = g < group.count;
  if (!valid) g = o = 0;
  const MatvecOperand& op = group.op[g];
  const int n_in = valid ? op.n_in : 0;  // no chunks past the last row
  const T* x = static_cast<const T*>(op.x);
  float acc[M] = {};
  if (op.scale != nullptr) {
    row_dot<T, int8_t, M, Team>(static_cast<const int8_t*>(op.w) + size_t(o) * op.n_in, x, n_in, t, acc);
  } else {
    row_dot<T, T, M, Team>(static_cast<const T*>(op.w) + size_t(o) * op.n_in, x, n_in, t, acc);
  }
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = group_sum<kLanes>(acc[m]);
  if constexpr (kWarpsPerTeam > 1) {  // split-K: the warps' sums meet in shared memory, added in warp order
    __shared__ float partial[kWarpsPerTeam][M];
    if (threadIdx.x % 32 == 0) {
#pragma unroll
      for (int m = 0; m < M; ++m) partial[threadIdx.x / 32][m] = acc[m];
    }
    __syncthreads();
#pragma unroll
    for (int m = 0; m < M; ++m) {
      acc[m] = partial[0][m];
#pragma unroll
      for (int i = 1; i < kWarpsPerTeam; ++i) acc[m] += partial[i][m];
    }
  }
  if (valid && t == 0) {
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

// The device's SM count, read once per device (the rule below runs on every launch).
int sm_count() {
  constexpr int kDevices = 64;
  static std::atomic<int> counts[kDevices] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kDevices) return 132;  // an H100's, if unknown
  int n = counts[device].load(std::memory_order_relaxed);
  if (n == 0) {
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) n = 132;
    counts[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

// The rule (see the top of the file): teams of 8 when the group's shortest row has at most
// kShortRow chunks; split-K when there are fewer rows than kWarpsPerSm warps per SM and every
// row has at least kSplitRow chunks; else a warp per row.
template <typename T>
int team_for(const MatvecGroup& group, int total_rows) {
  int shortest = INT_MAX;
  for (int g = 0; g < group.count; ++g) {
    const int weight_bytes = group.op[g].scale != nullptr ? 1 : int(sizeof(T));
    shortest = std::min(shortest, group.op[g].n_in * weight_bytes / kChunkBytes);
  }
  if (shortest <= kShortRow) return 8;
  if (shortest >= kSplitRow && total_rows < kWarpsPerSm * sm_count()) return kThreads;
  return 32;
}

template <typename T, int M, int Team>
void launch_team(int total_rows, const MatvecGroup& group, cudaStream_t stream) {
  constexpr int rows_per_block = kThreads / Team;
  matvec_kernel<T, M, Team><<<(total_rows + rows_per_block - 1) / rows_per_block, kThreads, 0, stream>>>(group);
}

template <typename T, int M = 1>
cudaError_t launch(int rows, const MatvecGroup& group, int team, cudaStream_t stream) {
  if constexpr (M < kMaxMatvecRows) {
    if (rows > M) return launch<T, M + 1>(rows, group, team, stream);
  }
  if (rows != M) return cudaErrorInvalidValue;
  int total = 0;
  for (int g = 0; g < group.count; ++g) total += group.op[g].n_out;
  if (total == 0) return cudaSuccess;
  switch (team == 0 ? team_for<T>(group, total) : team) {
    case 8: launch_team<T, M, 8>(total, group, stream); break;
    case 32: launch_team<T, M, 32>(total, group, stream); break;
    case kThreads: launch_team<T, M, kThreads>(total, group, stream); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t matvec(Dtype dtype, int rows, const MatvecGroup& group, int team, cudaStream_t stream) {
  if (rows < 1 || group.count < 1 || group.count > kMaxMatvecGroup) return cudaErrorInvalidValue;
  switch (dtype) {
    case Dtype::f32: return launch<float>(rows, group, team, stream);
    case Dtype::f16: return launch<__half>(rows, group, team, stream);
    case Dtype::bf16: return launch<__nv_bfloat16>(rows, group, team, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace rwkvkit
