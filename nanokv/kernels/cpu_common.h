// What the C++ CPU kernels share (cpu_decode.cpp, cpu_quant_decode.cpp, cpu_quest.cpp): widening
// to float32, a vectorizable exp, dot products, weighted row sums, and walking a head's slots
// block by block, a chunk of the online softmax, and merging a head's splits. Each .cpp that includes it gets its own copy (an anonymous namespace).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// bfloat16 is the top half of a float32: a shift the compiler vectorizes (the generic cast does not)
template <typename T>
inline float widen(T x) {
  return static_cast<float>(x);
}
template <>
inline float widen<c10::BFloat16>(c10::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// exp(x) for x <= 0 (softmax weights after the max is taken out), in float32: x = n ln2 + r, exp(r)
// by its Taylor polynomial to r^6, 2^n added to the exponent bits; relative error < 5e-7, 0 below
// -87. Written out because std::exp does not vectorize: this made the kernel 1.3-1.7x faster.
inline float exp_nonpositive(float x) {
  const float clamped = std::max(x, -87.0f);
  const float n = std::nearbyint(clamped * 1.44269504088896341f);
  const float r = clamped - n * 0.693145751953125f - n * 1.428606765330187045e-06f;  // ln 2 in two parts
  float p = 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  int32_t bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += static_cast<int32_t>(n) << 23;
  float result;
  std::memcpy(&result, &bits, sizeof result);
  return x < -87.0f ? 0.f : result;
}

inline float dot(const float* a, const float* b, int64_t D) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < D; ++d) s += a[d] * b[d];
  return s;
}

// acc [D] += sum_i w[i] * rows[i]. With the head size fixed, acc lives in registers for the loop.
template <int FIXED_D>
inline void add_weighted_rows(const float* w, const float* rows, int64_t n, int64_t head_dim, float* acc) {
  if constexpr (FIXED_D > 0) {
    float a[FIXED_D];
    for (int64_t d = 0; d < FIXED_D; ++d) a[d] = acc[d];
    for (int64_t i = 0; i < n; ++i) {
      if (w[i] == 0.f) continue;
#pragma omp simd
      for (int64_t d = 0; d < FIXED_D; ++d) a[d] += w[i] * rows[i * FIXED_D + d];
    }
    for (int64_t d = 0; d < FIXED_D; ++d) acc[d] = a[d];
  } else {
    for (int64_t i = 0; i < n; ++i) {
      if (w[i] == 0.f) continue;
#pragma omp simd
      for (int64_t d = 0; d < head_dim; ++d) acc[d] += w[i] * rows[i * head_dim + d];
    }
  }
}

// Slots gathered at a time. Copying a chunk's rows out of their blocks in one tight loop keeps many
// memory reads in flight; reading them inside the arithmetic kept few (a batch-64 step's decode
// attention over scattered blocks: 129 ms that way, ~80 ms this way). A chunk's float32 K and V
// copies stay in the core's L2; 16 to 128 slots measured the same.
constexpr int64_t CHUNK = 64;

// f(block, first slot, index from start, run) for each run of slots in [start, end) that lies in one
// block: a head's logical slots, block by block, through its table.
template <typename F>
inline void for_each_run(const int64_t* table, int64_t start, int64_t end, int64_t block_size, F&& f) {
  for (int64_t i = start; i < end;) {
    const int64_t block = table[i / block_size], slot = i % block_size;
    const int64_t run = std::min(block_size - slot, end - i);
    f(block, slot, i - start, run);
    i += run;
  }
}


// One chunk of the online softmax: scores [group, CHUNK] (the first n of each row, -inf where
// unseen) become weights in place, and the running state acc [group, D], best [group] and
// total [group] takes them in. A new largest score first shrinks what was summed by exp(old - new).
template <int FIXED_D>
inline void softmax_chunk(float* scores, const float* v, int64_t n, int64_t group, int64_t D, float* acc,
                          float* best, float* total) {
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < group; ++j) {
    float* s = scores + j * CHUNK;
    float m = neg_inf;
    for (int64_t i = 0; i < n; ++i) m = std::max(m, s[i]);
    if (m == neg_inf) continue;  // nothing visible in this chunk
    if (m > best[j]) {
      const float shrink = exp_nonpositive(best[j] - m);
      total[j] *= shrink;
      for (int64_t d = 0; d < D; ++d) acc[j * D + d] *= shrink;
      best[j] = m;
    }
    float t = 0.f;
#pragma omp simd reduction(+ : t)
    for (int64_t i = 0; i < n; ++i) {
      s[i] = exp_nonpositive(s[i] - best[j]);
      t += s[i];
    }
    total[j] += t;
    add_weighted_rows<FIXED_D>(s, v, n, D, acc + j * D);
  }
}

// A head's splits merged: each rescaled to the largest score of all, summed, and normalized.
// Each query head's largest score and sum of exp(score - largest) go to final_best, final_total.
template <typename T>
void merge_parts(const float* partials, int64_t splits, int64_t group, int64_t D, T* out, float* final_best = nullptr,
                 float* final_total = nullptr) {
  const int64_t stride = group * (D + 2);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  std::vector<float> acc(D);
  for (int64_t j = 0; j < group; ++j) {
    float m = neg_inf;
    for (int64_t s = 0; s < splits; ++s) m = std::max(m, partials[s * stride + group * D + j]);
    float total = 0.f;
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t s = 0; s < splits; ++s) {
      const float* part = partials + s * stride;
      if (part[group * D + j] == neg_inf) continue;
      const float w = exp_nonpositive(part[group * D + j] - m);
      total += w * part[group * D + group + j];
      for (int64_t d = 0; d < D; ++d) acc[d] += w * part[j * D + d];
    }
    const float inv = total > 0.f ? 1.f / total : 0.f;  // nothing visible: zeros
    for (int64_t d = 0; d < D; ++d) out[j * D + d] = static_cast<T>(acc[d] * inv);
    if (final_best != nullptr) final_best[j] = m;  // for the probabilities pass (cpu_decode.cpp)
    if (final_total != nullptr) final_total[j] = total;
  }
}

}  // namespace
