// Host-side entry points of rwkvkit's CUDA kernels (wkv7.cu, matvec.cu, decode.cu), called by the
// PyTorch bindings in rwkvkit_ops.cpp. Kept free of torch headers so nvcc compiles the kernels
// quickly and on machines whose PyTorch has no CUDA.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace rwkvkit {

enum class Dtype : int { f32, f16, bf16 };  // activation dtype of a kernel's inputs and outputs

constexpr int kHeadSize = 64;       // WKV-7 head size N the scan kernel is built for
constexpr int kMaxMatvecRows = 8;   // matvec handles up to this many activation rows
constexpr int kMaxMixes = 6;        // ln_mix: token-shift mix vectors per call (time mix has six)

// WKV-7 scan over T tokens. r, k, v, kk, a and y are [B, T, H, N] in `dtype`, w (the decay) is
// float [B, T, H, N], kv_in / kv_out are float [B, H, N, N] (value index first). kv_in is only read.
cudaError_t wkv7_forward(Dtype dtype, int B, int T, int H, const void* r, const float* w, const void* k, const void* v,
                         const void* kk, const void* a, const float* kv_in, float* kv_out, void* y, cudaStream_t stream);

// ---- matvec.cu: y_g = epilogue_g(W_g x_g) for a group of products in one launch (decoding)

constexpr int kMaxMatvecGroup = 8;  // products per launch

enum class Epilogue : int { none = 0, tanh = 1, sigmoid = 2, relu_square = 3 };

struct MatvecOperand {
  const void* w;       // [n_out, n_in]: int8 when scale is set, else the activation dtype; 16-byte aligned
  const float* scale;  // [n_out] per-row scales of int8 weights, or null
  const void* x;       // [rows, n_in], activation dtype, 16-byte aligned; n_in % (16 / sizeof(weight)) == 0
  void* y;             // [rows, n_out], activation dtype
  int n_in, n_out, epilogue;  // epilogue: an Epilogue
};

struct MatvecGroup {
  MatvecOperand op[kMaxMatvecGroup];
  const void* residual;  // [rows, n_out] added after the epilogue; only with count == 1, else null
  int count;
};

// team: threads sharing one row's dot product, one of kMatvecTeams (8: four rows per warp, 32: a
// warp per row, 128: split-K across a block), or 0 for matvec.cu's rule over the shapes.
constexpr int kMatvecTeams[] = {8, 32, 128};
cudaError_t matvec(Dtype dtype, int rows, const MatvecGroup& group, int team, cudaStream_t stream);

// ---- decode.cu: the ops ln_mix and time_mix_core for one token per sequence (plugins/cuda_backend.py)

struct MixVectors {
  const void* vector[kMaxMixes];  // [C] each, activation dtype
  int count;
};

// x_ln = LayerNorm(x) (weight, bias, eps); mixed[i] = x_ln + (x_prev - x_ln) * mixes.vector[i], in the
// caller's order.
// x, x_prev and x_ln are [B, C], mixed [mixes.count, B, C], all in `dtype`.
cudaError_t ln_mix(Dtype dtype, int B, int C, const void* x, const void* ln_w, const void* ln_b, const void* x_prev,
                   MixVectors mixes, float eps, void* x_ln, void* mixed, cudaStream_t stream);

// Everything of a time mix between its projections, for T = 1 and head size kHeadSize: see decode.cu.
// The constants come from the architecture (rwkv7.constants()), never from a copy here.
struct DecodeInputs {
  const void *r, *k, *v;  // [B, C]: the receptance, key and value projections
  const void *w_lora, *a_lora, *v_lora, *g;  // [B, C]: LoRA outputs (decay, in-context rate, value residual, gate); v_lora null in layer 0
  const void *w0, *a0, *v0, *k_k, *k_a, *r_k, *ln_w, *ln_b;  // [C]; v0 null in layer 0 (no value residual)
  const void* v_first;    // [B, C], layer 0's values (read only when v0 is set)
  const float* kv_in;     // [B, H, N, N] float, 16-byte aligned; only read
  float* kv_out;          // [B, H, N, N] float, 16-byte aligned
  void* out;              // [B, C]: (GroupNorm(y) + bonus) * gate
  float group_norm_eps;   // ln_x's epsilon
  float decay_scale;      // decay = exp(-decay_scale * sigmoid(w0 + w_lora))
  float kk_eps;           // floor on the removal key's norm (F.normalize's eps)
};
cudaError_t wkv7_decode(Dtype dtype, int B, int H, const DecodeInputs& in, cudaStream_t stream);

}  // namespace rwkvkit
