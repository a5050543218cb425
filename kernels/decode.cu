// Fused kernels for two of the backend ops (rwkvkit/backend.py) when decoding one token per
// sequence; the ops' plain-torch defaults there are the math they implement. A decode step of a
// small model is bound by kernel launches, not by arithmetic or bandwidth: the unfused block is ~60
// kernels, the cuda backend's ops 9 (these two, and the grouped matrix-vector products of
// matvec.cu), all of which a CUDA graph can capture.
//
//   ln_mix       layer norm of x, then the token-shift mixes x + (x_prev - x) * m, one per vector m
//                in the order the caller passes them (the kernel knows no names)
//   wkv7_decode  Backend.time_mix_core for T = 1: per (sequence, head) decay, in-context rate a,
//                removal key kk, modified k, value residual, the WKV-7 state update, GroupNorm
//                (ln_x), the bonus term and the gate
//
// Every constant of the math (norm epsilons, the decay scale, the removal key's norm floor) is an
// argument, passed down from the architecture module (rwkv7.constants()), never typed here.
// Everything is computed in float32 from the stored activations; outputs are rounded once.
#include <cstdint>

#include "cuda_dtypes.h"
#include "rwkvkit_cuda.h"

namespace rwkvkit {
namespace {

constexpr int N = kHeadSize;
constexpr int kThreads = 256;             // every kernel here; block_sum assumes it
constexpr int kSplit = kThreads / N;      // threads per state row in wkv7_decode (4)
constexpr int kGroups = N / 4 / kSplit;   // float4 column groups per thread (4)
static_assert(kThreads % N == 0 && N % (4 * kSplit) == 0 && kThreads % 32 == 0, "tile shape");

// Sum of x over the whole block; every thread gets the total. `scratch` holds kThreads / 32 floats;
// the leading barrier lets consecutive calls reuse it.
__device__ __forceinline__ float block_sum(float x, float* scratch) {
  x = group_sum<32>(x);
  __syncthreads();
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = x;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int i = 0; i < kThreads / 32; ++i) total += scratch[i];
  return total;
}

// ---------------------------------------------------------------- ln_mix: one block per sequence

template <typename T>
__global__ void __launch_bounds__(kThreads) ln_mix_kernel(int B, int C, const T* __restrict__ x, const T* __restrict__ ln_w,
                                                          const T* __restrict__ ln_b, const T* __restrict__ x_prev, MixVectors mixes,
                                                          float eps, T* __restrict__ x_ln, T* __restrict__ mixed) {
  __shared__ float scratch[kThreads / 32];
  const size_t row = size_t(blockIdx.x) * C;
  float sum = 0.f;
  for (int c = threadIdx.x; c < C; c += kThreads) sum += to_float(x[row + c]);
  const float mean = block_sum(sum, scratch) / C;
  float sq = 0.f;
  for (int c = threadIdx.x; c < C; c += kThreads) {
    const float d = to_float(x[row + c]) - mean;
    sq = fmaf(d, d, sq);
  }
  const float rstd = rsqrtf(block_sum(sq, scratch) / C + eps);
  for (int c = threadIdx.x; c < C; c += kThreads) {
    const T ln = from_float<T>(fmaf((to_float(x[row + c]) - mean) * rstd, to_float(ln_w[c]), to_float(ln_b[c])));
    x_ln[row + c] = ln;  // the state's new x_prev, and the base of every mix, as stored
    const float base = to_float(ln), dx = to_float(x_prev[row + c]) - base;
#pragma unroll
    for (int i = 0; i < kMaxMixes; ++i)  // unrolled: constant indices keep `mixes` in parameter space
      if (i < mixes.count)
        mixed[size_t(i) * B * C + row + c] = from_float<T>(fmaf(dx, to_float(static_cast<const T*>(mixes.vector[i])[c]), base));
  }
}

// ---------------------------------------------------------------- wkv7_decode: one block per (b, h)

template <typename T>
struct DecodeArgs {
  const T *r, *k, *v, *w_lora, *a_lora, *v_lora, *g;  // [B, C] each; v_lora null in layer 0
  const T *w0, *a0, *v0, *k_k, *k_a, *r_k, *ln_w, *ln_b;  // [C]; v0 null in layer 0
  const T* v_first;  // [B, C]; read only when v0 is set
  const float* kv_in;
  float* kv_out;
  T* out;  // [B, C]: ((GroupNorm(y) + bonus) * gate), the output projection's input
  float group_norm_eps, decay_scale, kk_eps;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) wkv7_decode_kernel(int B, int H, DecodeArgs<T> p) {
  __shared__ __align__(16) float s_r[N], s_w[N], s_k[N], s_kk[N], s_b[N];
  __shared__ float s_v[N], s_y[N], scratch[kThreads / 32];
  const int bh = blockIdx.x, b = bh / H, h = bh % H, C = H * N, tid = threadIdx.x;
  const bool lane_owns_channel = tid < N;
  const size_t idx = size_t(b) * C + h * N + tid;  // this thread's channel (tid < N)
  const int c = h * N + tid;

  // 1. per-channel inputs of the scan (threads tid < N; the others add zeros to the head sums)
  float r = 0.f, k = 0.f, v = 0.f, decay = 0.f, a = 0.f, kk = 0.f;
  if (lane_owns_channel) {
    r = to_float(p.r[idx]);
    const float k_raw = to_float(p.k[idx]), v_raw = to_float(p.v[idx]);
    decay = __expf(-p.decay_scale * sigmoid(to_float(p.w0[c]) + to_float(p.w_lora[idx])));
    a = sigmoid(to_float(p.a0[c]) + to_float(p.a_lora[idx]));
    kk = k_raw * to_float(p.k_k[c]);
    k = k_raw * fmaf(a - 1.f, to_float(p.k_a[c]), 1.f);
    v = v_raw;
    if (p.v0 != nullptr) {  // value residual: lerp towards layer 0's values
      const float mix = sigmoid(to_float(p.v0[c]) + to_float(p.v_lora[idx]));
      v = fmaf(to_float(p.v_first[idx]) - v_raw, mix, v_raw);
    }
  }
  kk /= fmaxf(sqrtf(block_sum(kk * kk, scratch)), p.kk_eps);  // F.normalize over the head
  const float bonus = block_sum(r * k * (lane_owns_channel ? to_float(p.r_k[c]) : 0.f), scratch);
  if (lane_owns_channel) s_r[tid] = r, s_w[tid] = decay, s_k[tid] = k, s_kk[tid] = kk, s_b[tid] = kk * a, s_v[tid] = v;
  __syncthreads();

  // 2. state update: kSplit threads per value row i, each holding kGroups float4 of its columns
  const int i = tid / kSplit, part = tid % kSplit;
  const size_t state_row = (size_t(bh) * N + i) * N;
  const float4* kv_row = reinterpret_cast<const float4*>(p.kv_in + state_row);
  const float4 *kk4 = reinterpret_cast<const float4*>(s_kk), *w4 = reinterpret_cast<const float4*>(s_w),
               *b4 = reinterpret_cast<const float4*>(s_b), *k4 = reinterpret_cast<const float4*>(s_k),
               *r4 = reinterpret_cast<const float4*>(s_r);
  float4 st[kGroups];
  float sa = 0.f;
#pragma unroll
  for (int g = 0; g < kGroups; ++g) {
    st[g] = kv_row[g * kSplit + part];
    sa += dot4(st[g], kk4[g * kSplit + part]);
  }
  sa = group_sum<kSplit>(sa);
  const float vi = s_v[i];
  float y = 0.f;
#pragma unroll
  for (int g = 0; g < kGroups; ++g) {
    const int j = g * kSplit + part;
    const float4 w = w4[j], bb = b4[j], kj = k4[j];
    st[g].x = fmaf(st[g].x, w.x, fmaf(-sa, bb.x, vi * kj.x));
    st[g].y = fmaf(st[g].y, w.y, fmaf(-sa, bb.y, vi * kj.y));
    st[g].z = fmaf(st[g].z, w.z, fmaf(-sa, bb.z, vi * kj.z));
    st[g].w = fmaf(st[g].w, w.w, fmaf(-sa, bb.w, vi * kj.w));
    reinterpret_cast<float4*>(p.kv_out + state_row)[j] = st[g];
    y += dot4(st[g], r4[j]);
  }
  y = group_sum<kSplit>(y);
  if (part == 0) s_y[i] = y;
  __syncthreads();

  // 3. GroupNorm over the head (ln_x), plus the current token's own r.k bonus, times the gate
  const float yc = lane_owns_channel ? s_y[tid] : 0.f;
  const float mean = block_sum(yc, scratch) / N;
  const float d = lane_owns_channel ? yc - mean : 0.f;
  const float rstd = rsqrtf(block_sum(d * d, scratch) / N + p.group_norm_eps);
  if (lane_owns_channel) {
    const float normed = fmaf(d * rstd, to_float(p.ln_w[c]), to_float(p.ln_b[c]));
    p.out[idx] = from_float<T>(fmaf(bonus, v, normed) * to_float(p.g[idx]));
  }
}

template <typename T>
cudaError_t launch_ln_mix(int B, int C, const void* x, const void* ln_w, const void* ln_b, const void* x_prev, MixVectors mixes,
                          float eps, void* x_ln, void* mixed, cudaStream_t stream) {
  ln_mix_kernel<T><<<B, kThreads, 0, stream>>>(B, C, static_cast<const T*>(x), static_cast<const T*>(ln_w), static_cast<const T*>(ln_b),
                                               static_cast<const T*>(x_prev), mixes, eps, static_cast<T*>(x_ln), static_cast<T*>(mixed));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_decode(int B, int H, const DecodeInputs& in, cudaStream_t stream) {
  auto cast = [](const void* ptr) { return static_cast<const T*>(ptr); };
  const DecodeArgs<T> args{cast(in.r),      cast(in.k),    cast(in.v),    cast(in.w_lora), cast(in.a_lora),  cast(in.v_lora),
                           cast(in.g),      cast(in.w0),   cast(in.a0),   cast(in.v0),     cast(in.k_k),     cast(in.k_a),
                           cast(in.r_k),    cast(in.ln_w), cast(in.ln_b), cast(in.v_first), in.kv_in,        in.kv_out,
                           static_cast<T*>(in.out), in.group_norm_eps, in.decay_scale, in.kk_eps};
  wkv7_decode_kernel<T><<<B * H, kThreads, 0, stream>>>(B, H, args);
  return cudaGetLastError();
}

}  // namespace

cudaError_t ln_mix(Dtype dtype, int B, int C, const void* x, const void* ln_w, const void* ln_b, const void* x_prev,
                   MixVectors mixes, float eps, void* x_ln, void* mixed, cudaStream_t stream) {
  switch (dtype) {
    case Dtype::f32: return launch_ln_mix<float>(B, C, x, ln_w, ln_b, x_prev, mixes, eps, x_ln, mixed, stream);
    case Dtype::f16: return launch_ln_mix<__half>(B, C, x, ln_w, ln_b, x_prev, mixes, eps, x_ln, mixed, stream);
    case Dtype::bf16: return launch_ln_mix<__nv_bfloat16>(B, C, x, ln_w, ln_b, x_prev, mixes, eps, x_ln, mixed, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t wkv7_decode(Dtype dtype, int B, int H, const DecodeInputs& in, cudaStream_t stream) {
  switch (dtype) {
    case Dtype::f32: return launch_decode<float>(B, H, in, stream);
    case Dtype::f16: return launch_decode<__half>(B, H, in, stream);
    case Dtype::bf16: return launch_decode<__nv_bfloat16>(B, H, in, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace rwkvkit
