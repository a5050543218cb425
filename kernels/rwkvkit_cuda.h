// Host-side entry points of rwkvkit's CUDA kernels (wkv7.cu, int8_matvec.cu), called by the
// PyTorch bindings in rwkvkit_ops.cpp. Kept free of torch headers so nvcc compiles the kernels
// quickly and on machines whose PyTorch has no CUDA.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace rwkvkit {

enum class Dtype : int { f32, f16, bf16 };  // activation dtype of a kernel's inputs and outputs

constexpr int kHeadSize = 64;       // WKV-7 head size N the scan kernel is built for
constexpr int kMaxMatvecRows = 8;   // int8_matvec handles up to this many activation rows

// WKV-7 scan over T tokens. r, k, v, kk, a and y are [B, T, H, N] in `dtype`, w (the decay) is
// float [B, T, H, N], kv_in / kv_out are float [B, H, N, N] (value index first). kv_in is only read.
cudaError_t wkv7_forward(Dtype dtype, int B, int T, int H, const void* r, const float* w, const void* k, const void* v,
                         const void* kk, const void* a, const float* kv_in, float* kv_out, void* y, cudaStream_t stream);

// y[m, o] = scale[o] * sum_i q[o, i] * x[m, i] for m < rows <= kMaxMatvecRows. x is [rows, n_in] and
// y [rows, n_out] in `dtype`; q is int8 [n_out, n_in]; n_in % 16 == 0; x and q 16-byte aligned.
cudaError_t int8_matvec(Dtype dtype, int rows, int n_in, int n_out, const void* x, const int8_t* q, const float* scale,
                        void* y, cudaStream_t stream);

}  // namespace rwkvkit
