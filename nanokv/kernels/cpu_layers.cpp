// The decoder's two small elementwise layers, RMSNorm and RoPE, each in one pass for the CPU.
// Built with cpu_decode.cpp by kernels/cpu.py; their plain-torch twins are RMSNorm.forward
// (models/llama.py) and apply_rope (models/rope.py), which the model runs where this is not built.
//
// In torch each is 7-9 small ops (upcast, square, mean, rsqrt, two products, a cast; two slices,
// a negation, a concatenation, two products, a sum). In a decode step of a small batch every op
// costs its dispatch more than its arithmetic, and the 61 norms and 30 RoPEs of a 30-layer model
// made up ~4 ms of a ~21 ms batch-1 step.
//
// Numerics follow the twins: RoPE rounds to the storage dtype after each product and after the
// sum, as torch's elementwise ops do, so it is bit-identical. RMSNorm takes the mean of squares
// in float32 like torch, but sums in its own order, so it may differ in the last bit of float32.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

// RoPE's products and sum must round one by one, as torch's do: no fused multiply-adds here
#pragma GCC optimize("fp-contract=off")

namespace {

constexpr int64_t ROWS_PER_TASK = 64;  // below this many rows a call stays on the calling thread

template <typename T>
void rms_norm_rows(const T* x, const T* weight, T* out, int64_t H, float eps, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const T* row = x + r * H;
    float squares = 0.f;
#pragma omp simd reduction(+ : squares)
    for (int64_t h = 0; h < H; ++h) squares += static_cast<float>(row[h]) * static_cast<float>(row[h]);
    const float inv_rms = 1.f / std::sqrt(squares / H + eps);
    for (int64_t h = 0; h < H; ++h) out[r * H + h] = weight[h] * static_cast<T>(static_cast<float>(row[h]) * inv_rms);
  }
}

// x [..., H] (rows contiguous), weight [H] in x's dtype -> weight * (x / rms(x)) as transformers'
// LlamaRMSNorm: normalised in float32, cast to the dtype, then multiplied by the weight.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.dim() == 1 && x.size(-1) == weight.size(0),
              "rms_norm: weight must be [H] in x's dtype");
  const auto xc = x.contiguous(), wc = weight.contiguous();
  const int64_t H = x.size(-1), rows = H ? x.numel() / H : 0;
  auto out = at::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rms_norm", [&] {
    at::parallel_for(0, rows, ROWS_PER_TASK, [&](int64_t begin, int64_t end) {
      rms_norm_rows(xc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), H,
                    static_cast<float>(eps), begin, end);
    });
  });
  return out;
}

// x [T, heads, D], cos and sin [T, D] in x's dtype -> x * cos + rotate_half(x) * sin, where
// rotate_half(x) = [-x[D/2:], x[:D/2]] (the rotate-half layout of Hugging Face checkpoints).
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == x.size(0) &&
                  cos.size(1) == x.size(2) && x.size(2) % 2 == 0,
              "rope: x [T, heads, D] with cos and sin [T, D], D even");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(),
              "rope: cos and sin must be in x's dtype");
  const auto xc = x.contiguous(), cc = cos.contiguous(), sc = sin.contiguous();
  const int64_t T = x.size(0), heads = x.size(1), D = x.size(2), half = D / 2;
  auto out = at::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rope", [&] {
    const scalar_t* x_ptr = xc.data_ptr<scalar_t>();
    const scalar_t* c_ptr = cc.data_ptr<scalar_t>();
    const scalar_t* s_ptr = sc.data_ptr<scalar_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    at::parallel_for(0, T * heads, ROWS_PER_TASK, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = x_ptr + r * D;
        const scalar_t* c = c_ptr + (r / heads) * D;
        const scalar_t* s = s_ptr + (r / heads) * D;
        scalar_t* o = out_ptr + r * D;
        // scalar_t arithmetic rounds each product and the sum to the dtype, as torch does
        for (int64_t d = 0; d < half; ++d) {
          const scalar_t a = row[d] * c[d], b = -row[d + half] * s[d];
          o[d] = a + b;
        }
        for (int64_t d = half; d < D; ++d) {
          const scalar_t a = row[d] * c[d], b = row[d - half] * s[d];
          o[d] = a + b;
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nanokv_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
}

TORCH_LIBRARY_IMPL(nanokv_cpu, CPU, m) {
  m.impl("rms_norm", rms_norm);
  m.impl("rope", rope);
}
