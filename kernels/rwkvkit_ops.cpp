// PyTorch bindings of the CUDA kernels: torch.ops.rwkvkit.wkv7 and torch.ops.rwkvkit.int8_matvec.
// Registered with TORCH_LIBRARY (no Python module), so the ops go through the dispatcher, run on
// the current stream and can be captured in CUDA graphs. Every input is checked here, so a wrong
// call raises a Python error instead of reading out of bounds.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "rwkvkit_cuda.h"

namespace rwkvkit {
namespace {

Dtype dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::f32;
    case at::kHalf: return Dtype::f16;
    case at::kBFloat16: return Dtype::bf16;
    default: TORCH_CHECK(false, "rwkvkit kernels take float32, float16 or bfloat16 activations, got ", t.scalar_type());
  }
}

void check(const at::Tensor& t, const char* name, const at::Tensor& like, at::ScalarType dtype, at::IntArrayRef sizes,
           bool vector_loads = false) {
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), ", expected ", like.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " has dtype ", t.scalar_type(), ", expected ", dtype);
  TORCH_CHECK(t.sizes() == sizes, name, " has shape ", t.sizes(), ", expected ", sizes);
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(!vector_loads || reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0, name, " must be 16-byte aligned");
}

std::tuple<at::Tensor, at::Tensor> wkv7_op(const at::Tensor& kv, const at::Tensor& r, const at::Tensor& w,
                                           const at::Tensor& k, const at::Tensor& v, const at::Tensor& kk,
                                           const at::Tensor& a) {
  TORCH_CHECK(r.is_cuda() && r.dim() == 4 && r.size(3) == kHeadSize, "wkv7: r must be a CUDA tensor [B, T, H, ",
              kHeadSize, "], got ", r.sizes(), " on ", r.device());
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2);
  check(r, "r", r, r.scalar_type(), r.sizes());
  check(k, "k", r, r.scalar_type(), r.sizes());
  check(v, "v", r, r.scalar_type(), r.sizes());
  check(kk, "kk", r, r.scalar_type(), r.sizes());
  check(a, "a", r, r.scalar_type(), r.sizes());
  check(w, "w (decay)", r, at::kFloat, r.sizes());
  check(kv, "kv (state)", r, at::kFloat, {B, H, kHeadSize, kHeadSize}, true);
  const c10::cuda::CUDAGuard guard(r.device());
  at::Tensor y = at::empty({B, T, H * kHeadSize}, r.options());
  at::Tensor kv_out = at::empty_like(kv);
  if (B * H > 0) {
    C10_CUDA_CHECK(wkv7_forward(dtype_of(r), B, T, H, r.data_ptr(), w.data_ptr<float>(), k.data_ptr(), v.data_ptr(),
                                kk.data_ptr(), a.data_ptr(), kv.data_ptr<float>(), kv_out.data_ptr<float>(), y.data_ptr(),
                                c10::cuda::getCurrentCUDAStream()));
  }
  return {y, kv_out};
}

at::Tensor int8_matvec_op(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= kMaxMatvecRows,
              "int8_matvec: x must be a CUDA tensor [rows, in] with 1 <= rows <= ", kMaxMatvecRows, ", got ", x.sizes());
  TORCH_CHECK(q.dim() == 2 && x.size(1) == q.size(1) && q.size(1) % 16 == 0,
              "int8_matvec: q must be [out, in] with in == x.size(1) and in % 16 == 0, got ", q.sizes());
  const int64_t rows = x.size(0), n_in = x.size(1), n_out = q.size(0);
  check(x, "x", x, x.scalar_type(), x.sizes(), true);
  check(q, "q", x, at::kChar, {n_out, n_in}, true);
  check(scale, "scale", x, at::kFloat, {n_out});
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({rows, n_out}, x.options());
  C10_CUDA_CHECK(int8_matvec(dtype_of(x), rows, n_in, n_out, x.data_ptr(), q.data_ptr<int8_t>(), scale.data_ptr<float>(),
                             y.data_ptr(), c10::cuda::getCurrentCUDAStream()));
  return y;
}

}  // namespace
}  // namespace rwkvkit

TORCH_LIBRARY(rwkvkit, m) {
  m.def("wkv7(Tensor kv, Tensor r, Tensor w, Tensor k, Tensor v, Tensor kk, Tensor a) -> (Tensor, Tensor)");
  m.def("int8_matvec(Tensor x, Tensor q, Tensor scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(rwkvkit, CUDA, m) {
  m.impl("wkv7", &rwkvkit::wkv7_op);
  m.impl("int8_matvec", &rwkvkit::int8_matvec_op);
}
