// bfloat16 matrix-vector products for the CPU: y = x W^T for a few rows of x, the weight-bound
// matmuls of a small decode batch. Built with cpu_decode.cpp by kernels/cpu.py.
//
// A decode step at batch 1 reads every weight once and does little else: its speed is the
// memory bandwidth the matmuls reach. oneDNN's packed weights (models/cpu_linear.py) reached
// 16-18 GB/s here; this loop, over the plain row-major weight with the next rows prefetched,
// 20-24 GB/s. Each output is a float32 sum of bf16 products (AVX512-BF16's dot instruction),
// rounded to bfloat16 once, as F.linear does; the order of the sum differs, so the last bit may.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t ROWS = 4;           // weight rows per step of the loop: four independent sums
constexpr int64_t PREFETCH_ROWS = 16;  // how far ahead the next rows are asked for

#if defined(__AVX512BF16__)
inline uint16_t round_to_bf16(float value) {  // round to nearest even, as torch does
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  bits += 0x7FFF + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
}

void gemv_rows(const uint16_t* x, const uint16_t* w, const float* bias, uint16_t* y, int64_t M, int64_t K,
               int64_t N, int64_t begin, int64_t end) {
  for (int64_t n0 = begin; n0 < end; n0 += ROWS) {
    const int64_t rows = std::min(ROWS, end - n0);
    const char* ahead = reinterpret_cast<const char*>(w + (n0 + PREFETCH_ROWS) * K);
    if (n0 + PREFETCH_ROWS + ROWS <= N)
      for (int64_t b = 0; b < ROWS * K * 2; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
    for (int64_t m = 0; m < M; ++m) {
      __m512 acc[ROWS];
      for (int64_t j = 0; j < ROWS; ++j) acc[j] = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; k += 32) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);
        for (int64_t j = 0; j < rows; ++j)
          acc[j] = _mm512_dpbf16_ps(acc[j], xv, (__m512bh)_mm512_loadu_si512(w + (n0 + j) * K + k));
      }
      for (int64_t j = 0; j < rows; ++j)
        y[m * N + n0 + j] = round_to_bf16(_mm512_reduce_add_ps(acc[j]) + (bias ? bias[n0 + j] : 0.f));
    }
  }
}
#endif

bool gemv_available() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

// x [M, K], w [N, K] (bfloat16, contiguous; K a multiple of 32), bias [N] or none -> [M, N]
at::Tensor gemv(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(gemv_available(), "gemv: this build has no AVX512-BF16");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "gemv: bfloat16 only");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1) && x.size(1) % 32 == 0,
              "gemv: x [M, K] and w [N, K] with K a multiple of 32");
  const auto xc = x.contiguous(), wc = w.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = at::empty({M, N}, x.options());
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) bias_f = bias->to(at::kFloat).contiguous();
#if defined(__AVX512BF16__)
  const auto* x_ptr = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  const auto* w_ptr = reinterpret_cast<const uint16_t*>(wc.data_ptr());
  const float* b_ptr = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  auto* y_ptr = reinterpret_cast<uint16_t*>(y.data_ptr());
  // each thread a contiguous range of rows, a multiple of ROWS: one stream through the weight
  at::parallel_for(0, (N + ROWS - 1) / ROWS, 1, [&](int64_t begin, int64_t end) {
    gemv_rows(x_ptr, w_ptr, b_ptr, y_ptr, M, K, N, begin * ROWS, std::min(N, end * ROWS));
  });
#endif
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nanokv_cpu, m) {
  m.def("gemv(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("gemv_available() -> bool", gemv_available);
}

TORCH_LIBRARY_IMPL(nanokv_cpu, CPU, m) { m.impl("gemv", gemv); }
