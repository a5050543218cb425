// PyTorch bindings of the CUDA kernels: torch.ops.rwkvkit.wkv7, matvec, ln_mix and wkv7_decode.
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

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

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

// `sizes` with its last entry replaced: a token tensor [..., n] of the same rows, another width.
std::vector<int64_t> with_width(at::IntArrayRef sizes, int64_t width) {
  std::vector<int64_t> out(sizes.begin(), sizes.end());
  out.back() = width;
  return out;
}

// The rows of a token tensor [..., n] (n > 0): the product of its leading sizes.
int64_t rows_of(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.is_cuda() && t.dim() >= 1 && t.size(-1) > 0, op, ": expected a CUDA tensor [..., n] with n > 0, got ", t.sizes(),
              " on ", t.device());
  return t.numel() / t.size(-1);
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

// One launch for a group of products; scale[g] is an empty tensor for a weight in the activation
// dtype, else the int8 weight's per-row scales. Inputs x_g [..., in_g] share their leading sizes
// (1 to kMaxMatvecRows rows in all); returns y_g [..., out_g] for each g. team: 0 for the kernel's
// own choice per shape, or one of kMatvecTeams to force one (tests and benchmarks).
std::vector<at::Tensor> matvec_op(at::TensorList x, at::TensorList w, at::TensorList scale, at::IntArrayRef epilogue,
                                  const std::optional<at::Tensor>& residual, int64_t team) {
  const size_t count = x.size();
  TORCH_CHECK(count >= 1 && count <= static_cast<size_t>(kMaxMatvecGroup) && w.size() == count && scale.size() == count &&
                  epilogue.size() == count,
              "matvec: 1 to ", kMaxMatvecGroup, " products, with as many weights, scales and epilogues; got ", count, " inputs, ",
              w.size(), " weights, ", scale.size(), " scales, ", epilogue.size(), " epilogues");
  const at::Tensor& first = x[0];
  const int64_t rows = rows_of(first, "matvec");
  TORCH_CHECK(rows >= 1 && rows <= kMaxMatvecRows, "matvec: 1 to ", kMaxMatvecRows, " rows, got ", first.sizes());
  TORCH_CHECK(team == 0 || std::find(std::begin(kMatvecTeams), std::end(kMatvecTeams), team) != std::end(kMatvecTeams),
              "matvec: team must be 0 (chosen per shape) or one of 8, 32, 128 threads per row, got ", team);
  MatvecGroup group{};
  group.count = static_cast<int>(count);
  std::vector<at::Tensor> y;
  const c10::cuda::CUDAGuard guard(first.device());
  for (size_t g = 0; g < count; ++g) {
    const bool int8 = scale[g].numel() > 0;
    TORCH_CHECK(w[g].dim() == 2, "matvec: weight ", g, " must be [out, in], got ", w[g].sizes());
    const int64_t n_out = w[g].size(0), n_in = w[g].size(1), per_load = int8 ? 16 : 16 / first.element_size();
    TORCH_CHECK(n_in % per_load == 0, "matvec: weight ", g, " has ", n_in, " inputs, not a multiple of ", per_load);
    check(x[g], "x", first, first.scalar_type(), with_width(first.sizes(), n_in), true);
    check(w[g], "weight", first, int8 ? at::kChar : first.scalar_type(), {n_out, n_in}, true);
    if (int8) check(scale[g], "scale", first, at::kFloat, {n_out});
    TORCH_CHECK(epilogue[g] >= 0 && epilogue[g] <= static_cast<int64_t>(Epilogue::relu_square), "matvec: unknown epilogue ", epilogue[g]);
    y.push_back(at::empty(with_width(first.sizes(), n_out), first.options()));
    group.op[g] = MatvecOperand{w[g].data_ptr(), int8 ? scale[g].data_ptr<float>() : nullptr, x[g].data_ptr(), y.back().data_ptr(),
                                static_cast<int>(n_in), static_cast<int>(n_out), static_cast<int>(epilogue[g])};
  }
  if (residual) {
    TORCH_CHECK(count == 1, "matvec: a residual is added to a single product, not a group of ", count);
    check(*residual, "residual", first, first.scalar_type(), y[0].sizes());
    group.residual = residual->data_ptr();
  }
  C10_CUDA_CHECK(matvec(dtype_of(first), static_cast<int>(rows), group, static_cast<int>(team), c10::cuda::getCurrentCUDAStream()));
  return y;
}

// One token per sequence: x [B, C] or [B, 1, C], x_prev [B, C]. Returns (x_ln [B, C], mixed [n, *x.sizes()]).
std::tuple<at::Tensor, at::Tensor> ln_mix_op(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                              const at::Tensor& x_prev, at::TensorList mixes, double eps) {
  const int64_t B = rows_of(x, "ln_mix"), C = x.size(-1);
  TORCH_CHECK(!mixes.empty() && mixes.size() <= static_cast<size_t>(kMaxMixes), "ln_mix: 1 to ", kMaxMixes, " mix vectors, got ",
              mixes.size());
  check(x, "x", x, x.scalar_type(), x.sizes());
  check(x_prev, "x_prev", x, x.scalar_type(), {B, C});
  check(weight, "weight", x, x.scalar_type(), {C});
  check(bias, "bias", x, x.scalar_type(), {C});
  MixVectors vectors{};
  vectors.count = static_cast<int>(mixes.size());
  for (size_t i = 0; i < mixes.size(); ++i) {
    check(mixes[i], "mix vector", x, x.scalar_type(), {C});
    vectors.vector[i] = mixes[i].data_ptr();
  }
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor x_ln = at::empty_like(x_prev);
  std::vector<int64_t> mixed_sizes{static_cast<int64_t>(mixes.size())};
  mixed_sizes.insert(mixed_sizes.end(), x.sizes().begin(), x.sizes().end());
  at::Tensor mixed = at::empty(mixed_sizes, x.options());
  if (B > 0) {
    C10_CUDA_CHECK(ln_mix(dtype_of(x), B, C, x.data_ptr(), weight.data_ptr(), bias.data_ptr(), x_prev.data_ptr(), vectors,
                          static_cast<float>(eps), x_ln.data_ptr(), mixed.data_ptr(), c10::cuda::getCurrentCUDAStream()));
  }
  return {x_ln, mixed};
}

// One token per sequence: r and the other token tensors [B, C] or [B, 1, C] (out has r's shape).
std::tuple<at::Tensor, at::Tensor> wkv7_decode_op(const at::Tensor& kv, const at::Tensor& r, const at::Tensor& k,
                                                  const at::Tensor& v, const at::Tensor& w_lora, const at::Tensor& a_lora,
                                                  const std::optional<at::Tensor>& v_lora, const at::Tensor& g, const at::Tensor& w0,
                                                  const at::Tensor& a0, const std::optional<at::Tensor>& v0, const at::Tensor& k_k,
                                                  const at::Tensor& k_a, const at::Tensor& r_k, const at::Tensor& ln_w,
                                                  const at::Tensor& ln_b, const at::Tensor& v_first, double group_norm_eps,
                                                  double decay_scale, double kk_eps) {
  const int64_t B = rows_of(r, "wkv7_decode"), C = r.size(-1), H = C / kHeadSize;
  TORCH_CHECK(C % kHeadSize == 0, "wkv7_decode: r must be [..., H * ", kHeadSize, "] (one token of B sequences), got ", r.sizes());
  check(r, "r", r, r.scalar_type(), r.sizes());
  check(k, "k", r, r.scalar_type(), r.sizes());
  check(v, "v", r, r.scalar_type(), r.sizes());
  check(v_first, "v_first", r, r.scalar_type(), r.sizes());
  check(w_lora, "w_lora", r, r.scalar_type(), r.sizes());
  check(a_lora, "a_lora", r, r.scalar_type(), r.sizes());
  check(g, "g", r, r.scalar_type(), r.sizes());
  TORCH_CHECK(v_lora.has_value() == v0.has_value(), "wkv7_decode: v_lora and v0 come together (every layer but the first)");
  if (v_lora) check(*v_lora, "v_lora", r, r.scalar_type(), r.sizes());
  const std::pair<const at::Tensor*, const char*> vectors[] = {{&w0, "w0"},   {&a0, "a0"},     {&k_k, "k_k"},  {&k_a, "k_a"},
                                                               {&r_k, "r_k"}, {&ln_w, "ln_w"}, {&ln_b, "ln_b"}};
  for (const auto& [t, name] : vectors) check(*t, name, r, r.scalar_type(), {C});
  if (v0) check(*v0, "v0", r, r.scalar_type(), {C});
  check(kv, "kv (state)", r, at::kFloat, {B, H, kHeadSize, kHeadSize}, true);
  const c10::cuda::CUDAGuard guard(r.device());
  at::Tensor out = at::empty_like(r);
  at::Tensor kv_out = at::empty_like(kv);
  if (B > 0) {
    const DecodeInputs in{r.data_ptr(),      k.data_ptr(),      v.data_ptr(),    w_lora.data_ptr(),
                          a_lora.data_ptr(), v_lora ? v_lora->data_ptr() : nullptr, g.data_ptr(),
                          w0.data_ptr(),     a0.data_ptr(),     v0 ? v0->data_ptr() : nullptr,   k_k.data_ptr(),
                          k_a.data_ptr(),    r_k.data_ptr(),    ln_w.data_ptr(), ln_b.data_ptr(), v_first.data_ptr(),
                          kv.data_ptr<float>(), kv_out.data_ptr<float>(), out.data_ptr(), static_cast<float>(group_norm_eps),
                          static_cast<float>(decay_scale), static_cast<float>(kk_eps)};
    C10_CUDA_CHECK(wkv7_decode(dtype_of(r), B, H, in, c10::cuda::getCurrentCUDAStream()));
  }
  return {out, kv_out};
}

}  // namespace
}  // namespace rwkvkit

TORCH_LIBRARY(rwkvkit, m) {
  m.def("wkv7(Tensor kv, Tensor r, Tensor w, Tensor k, Tensor v, Tensor kk, Tensor a) -> (Tensor, Tensor)");
  m.def("matvec(Tensor[] x, Tensor[] w, Tensor[] scale, int[] epilogue, Tensor? residual, int team=0) -> Tensor[]");
  m.def("ln_mix(Tensor x, Tensor weight, Tensor bias, Tensor x_prev, Tensor[] mixes, float eps) -> (Tensor, Tensor)");
  m.def(
      "wkv7_decode(Tensor kv, Tensor r, Tensor k, Tensor v, Tensor w_lora, Tensor a_lora, Tensor? v_lora, Tensor g, Tensor w0, "
      "Tensor a0, Tensor? v0, Tensor k_k, Tensor k_a, Tensor r_k, Tensor ln_w, Tensor ln_b, Tensor v_first, float group_norm_eps, "
      "float decay_scale, float kk_eps) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rwkvkit, CUDA, m) {
  m.impl("wkv7", &rwkvkit::wkv7_op);
  m.impl("matvec", &rwkvkit::matvec_op);
  m.impl("ln_mix", &rwkvkit::ln_mix_op);
  m.impl("wkv7_decode", &rwkvkit::wkv7_decode_op);
}
