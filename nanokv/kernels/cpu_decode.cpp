// Paged decode attention and KV writes for the CPU, compiled at first use by kernels/cpu.py.
//
// The plain-torch twin (kernels/reference.py, paged_attention with T = 1) gathers every head's
// blocks into a fresh K and V, then runs ~20 small tensor ops per layer. Here each (sequence,
// kv-head) is one task: 64 slots at a time are copied out of their blocks into a small float32
// buffer, then scored for the group's query heads and summed into V with an online softmax (the
// running max and sum rescale what came before, as in flash attention). Same rule by position:
// a key is seen when k_pos <= q_pos and, with a window W > 0, q_pos - k_pos < W.
//
// With probabilities (paged_decode_probs, what H2O and TOVA score with): each task also writes
// its raw scores into the output [B, Hkv, group, nb * block_size] as it goes, and once the
// splits are merged and every head's final max and sum are known, a second pass over the same
// rows (still in cache) turns each score into exp(score - max) / sum, 0 where masked or past the
// head's length: the twin's layout, slot by slot of each head's table. Storing the scores costs a
// few stores per slot; computing them again in the second pass would read K a second time.
//
// With a bias (paged_decode_bias, paged_decode_bias_probs: a method's float32 slot field, KeepKV's
// log vote counts), each slot's value is added to its scaled score, copied out of its block with
// the positions; the ops without one read nothing more.
//
// Numerics: float32 throughout (the twin rounds scores and probabilities to the storage dtype
// between its matmuls), so the two agree to that rounding, not bit for bit. A query that sees no
// key gets zeros for its output and its probabilities (the twin's softmax gives NaN there).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

#include "cpu_common.h"

namespace {

struct Scratch {
  std::vector<float> q, k, v, scores, bias;
  std::vector<int32_t> pos;
};

// Slots [start, end) of one (sequence, kv-head), chunk by chunk with an online softmax: the
// group's unnormalized output acc [group, D], each query head's largest score best [group] and sum
// of exp(score - best) total [group], written to partial = [acc | best | total]. With
// `raw_scores` (group rows `row_stride` apart, indexed by slot), each slot's scaled score is also
// kept there, -inf where masked. `bias_pool` (or nullptr): a float per slot added to its scaled
// score. FIXED_D > 0 compiles a copy for that head size, whose loops the compiler unrolls.
template <typename T, int FIXED_D>
void decode_part(const T* q, int64_t q_pos, const T* k_pool, const T* v_pool, const int32_t* pos_pool,
                 const int64_t* table, int64_t start, int64_t end, int64_t window, int64_t group, int64_t head_dim,
                 int64_t block_size, int64_t kv_block_stride, int64_t kv_slot_stride, int64_t pos_block_stride,
                 float* partial, Scratch& scratch, float* raw_scores, int64_t row_stride, const float* bias_pool,
                 int64_t bias_block_stride) {
  const int64_t D = FIXED_D > 0 ? FIXED_D : head_dim;
  float* acc = partial;
  float* best = partial + group * D;
  float* total = best + group;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  std::fill(acc, acc + group * D, 0.f);
  std::fill(best, best + group, neg_inf);
  std::fill(total, total + group, 0.f);
  scratch.q.resize(group * D);
  scratch.k.resize(CHUNK * D);
  scratch.v.resize(CHUNK * D);
  scratch.pos.resize(CHUNK);
  scratch.scores.resize(group * CHUNK);
  scratch.bias.resize(CHUNK);
  float *qf = scratch.q.data(), *k = scratch.k.data(), *v = scratch.v.data(), *scores = scratch.scores.data();
  float* bias = scratch.bias.data();
  int32_t* pos = scratch.pos.data();
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  for (int64_t e = 0; e < group * D; ++e) qf[e] = widen(q[e]) * scale;
  for (int64_t c = start; c < end; c += CHUNK) {
    const int64_t n = std::min(CHUNK, end - c);
    for_each_run(table, c, c + n, block_size, [&](int64_t block, int64_t slot, int64_t i, int64_t run) {
      for (int64_t r = 0; r < run; ++r) {  // gather
        const T* k_row = k_pool + block * kv_block_stride + (slot + r) * kv_slot_stride;
        const T* v_row = v_pool + block * kv_block_stride + (slot + r) * kv_slot_stride;
        float* k_dst = k + (i + r) * D;
        float* v_dst = v + (i + r) * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) {
          k_dst[d] = widen(k_row[d]);
          v_dst[d] = widen(v_row[d]);
        }
      }
      std::memcpy(pos + i, pos_pool + block * pos_block_stride + slot, run * sizeof(int32_t));
      if (bias_pool != nullptr) std::memcpy(bias + i, bias_pool + block * bias_block_stride + slot, run * sizeof(float));
    });
    if (c + CHUNK < end) {  // the next chunk's rows start coming in while this one is computed
      for_each_run(table, c + CHUNK, std::min(c + 2 * CHUNK, end), block_size,
                   [&](int64_t block, int64_t slot, int64_t, int64_t run) {
        const char* k_first = reinterpret_cast<const char*>(k_pool + block * kv_block_stride + slot * kv_slot_stride);
        const char* v_first = reinterpret_cast<const char*>(v_pool + block * kv_block_stride + slot * kv_slot_stride);
        const int64_t bytes = ((run - 1) * kv_slot_stride + D) * sizeof(T);
        for (int64_t b = 0; b < bytes; b += 64) {
          __builtin_prefetch(k_first + b);
          __builtin_prefetch(v_first + b);
        }
      });
    }
    for (int64_t i = 0; i < n; ++i) {
      const bool seen = pos[i] <= q_pos && (window <= 0 || q_pos - pos[i] < window);
      const float add = bias_pool != nullptr ? bias[i] : 0.f;
      for (int64_t j = 0; j < group; ++j) scores[j * CHUNK + i] = seen ? dot(qf + j * D, k + i * D, D) + add : neg_inf;
    }
    if (raw_scores != nullptr) {  // before the exps below overwrite them
      for (int64_t j = 0; j < group; ++j) std::memcpy(raw_scores + j * row_stride + c, scores + j * CHUNK, n * sizeof(float));
    }
    softmax_chunk<FIXED_D>(scores, v, n, group, D, acc, best, total);
  }
}

// One query head's row of raw scores [S] turned into probabilities in place: the first `length`
// slots exp(score - best) / total (a masked slot's -inf gives 0), the rest (past the head's
// length, never scored) 0.
inline void normalize_row(float* row, int64_t length, int64_t S, float best, float total) {
  if (!(total > 0.f)) {  // nothing visible
    std::fill(row, row + S, 0.f);
    return;
  }
  const float inv = 1.f / total;
#pragma omp simd
  for (int64_t i = 0; i < length; ++i) row[i] = exp_nonpositive(row[i] - best) * inv;
  std::fill(row + length, row + S, 0.f);
}

// q [B, Hq, D]; q_pos [B]; k_pool, v_pool [N, block_size, D] (rows contiguous); pos_pool [N,
// block_size] int32; tables [B, Hkv, nb]; lengths [B, Hkv]; window <= 0 for none -> [B, Hq, D],
// and with `probs` defined (float32 [B, Hkv, group, nb * block_size], contiguous) the attention
// probabilities written there. With fewer (sequence, kv-head) pairs than threads (a decode of
// one or two sequences), each head's slots are cut into splits that the threads share, then
// merged (flash-decoding).
at::Tensor decode_impl(const at::Tensor& q, const at::Tensor& q_pos, const at::Tensor& k_pool,
                       const at::Tensor& v_pool, const at::Tensor& pos_pool, const at::Tensor& tables,
                       const at::Tensor& lengths, int64_t window, at::Tensor probs, const at::Tensor& bias) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 3 && tables.dim() == 3, "paged_decode: bad ranks");
  TORCH_CHECK(k_pool.stride(2) == 1 && v_pool.stride(2) == 1 && k_pool.strides() == v_pool.strides(),
              "paged_decode: K and V pools need the same strides and contiguous rows");
  TORCH_CHECK(pos_pool.scalar_type() == at::kInt && pos_pool.stride(1) == 1, "paged_decode: pos_pool must be int32");
  TORCH_CHECK(q.scalar_type() == k_pool.scalar_type(), "paged_decode: q and the pools must share a dtype");
  TORCH_CHECK(!bias.defined() || (bias.scalar_type() == at::kFloat && bias.stride(1) == 1),
              "paged_decode: the bias must be a float32 slot field");
  const float* bias_ptr = bias.defined() ? bias.data_ptr<float>() : nullptr;
  const int64_t bias_stride = bias.defined() ? bias.stride(0) : 0;
  const auto qc = q.contiguous();
  const auto qp = q_pos.to(at::kLong).contiguous();
  const auto tab = tables.to(at::kLong).contiguous();
  const auto len = lengths.to(at::kLong).contiguous();
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = tables.size(1), nb = tables.size(2);
  const int64_t group = Hq / Hkv, block_size = k_pool.size(1), heads = B * Hkv, S = nb * block_size;
  float* probs_ptr = probs.defined() ? probs.data_ptr<float>() : nullptr;
  // enough splits for 4 per thread, none shorter than SPLIT_MIN slots
  constexpr int64_t SPLIT_MIN = 128;
  const int64_t wanted = (4 * at::get_num_threads() + heads - 1) / heads;
  const int64_t splits = std::max<int64_t>(1, std::min(wanted, S / SPLIT_MIN));
  const int64_t split_len = (S + splits - 1) / splits;
  auto out = at::empty_like(qc);
  std::vector<float> partials(heads * splits * group * (D + 2));
  std::vector<float> final_best(heads * group), final_total(heads * group);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    const scalar_t* q_ptr = qc.data_ptr<scalar_t>();
    const scalar_t* k_ptr = k_pool.data_ptr<scalar_t>();
    const scalar_t* v_ptr = v_pool.data_ptr<scalar_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    const int32_t* pos_ptr = pos_pool.data_ptr<int32_t>();
    const int64_t* tab_ptr = tab.data_ptr<int64_t>();
    const int64_t* len_ptr = len.data_ptr<int64_t>();
    const int64_t* qp_ptr = qp.data_ptr<int64_t>();
    const auto part = D == 64 ? decode_part<scalar_t, 64> : D == 128 ? decode_part<scalar_t, 128>
                                                                    : decode_part<scalar_t, 0>;
    // heads by length; each thread gets a contiguous range of indices, and index i runs task i / 2
    // from the short end or the long end, so a range holds short and long heads alike
    std::vector<int64_t> by_length(heads);
    std::iota(by_length.begin(), by_length.end(), 0);
    std::stable_sort(by_length.begin(), by_length.end(), [&](int64_t a, int64_t b) { return len_ptr[a] < len_ptr[b]; });
    const int64_t tasks = heads * splits;
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      Scratch scratch;
      for (int64_t i = begin; i < end; ++i) {
        const int64_t task = i % 2 == 0 ? i / 2 : tasks - 1 - i / 2;
        const int64_t head = by_length[task / splits], split = task % splits, b = head / Hkv, h = head % Hkv;
        const int64_t length = std::min(len_ptr[head], S);
        const int64_t start = std::min(length, split * split_len);
        // the head's rows of scores, indexed by slot (decode_part's chunks start at `start`)
        float* raw = probs_ptr == nullptr ? nullptr : probs_ptr + head * group * S;
        part(q_ptr + (b * Hq + h * group) * D, qp_ptr[b], k_ptr, v_ptr, pos_ptr, tab_ptr + head * nb, start,
             std::min(length, start + split_len), window, group, D, block_size, k_pool.stride(0), k_pool.stride(1),
             pos_pool.stride(0), partials.data() + (head * splits + split) * group * (D + 2), scratch, raw, S,
             bias_ptr, bias_stride);
      }
    });
    // in one thread: a few flops a head, less than waking the others again
    for (int64_t head = 0; head < heads; ++head) {
      const int64_t b = head / Hkv, h = head % Hkv;
      merge_parts(partials.data() + head * splits * group * (D + 2), splits, group, D,
                  out_ptr + (b * Hq + h * group) * D, final_best.data() + head * group,
                  final_total.data() + head * group);
    }
  });
  if (probs_ptr != nullptr) {  // the second pass: scores to probabilities, now that each row's max and sum are final
    at::parallel_for(0, heads * group, 1, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t length = std::min(len.data_ptr<int64_t>()[row / group], S);
        normalize_row(probs_ptr + row * S, length, S, final_best[row], final_total[row]);
      }
    });
  }
  return out;
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& q_pos, const at::Tensor& k_pool,
                        const at::Tensor& v_pool, const at::Tensor& pos_pool, const at::Tensor& tables,
                        const at::Tensor& lengths, int64_t window) {
  return decode_impl(q, q_pos, k_pool, v_pool, pos_pool, tables, lengths, window, at::Tensor(), at::Tensor());
}

// paged_decode with each slot's bias (a float32 field [N, block_size]) added to its scaled score.
at::Tensor paged_decode_bias(const at::Tensor& q, const at::Tensor& q_pos, const at::Tensor& k_pool,
                             const at::Tensor& v_pool, const at::Tensor& pos_pool, const at::Tensor& tables,
                             const at::Tensor& lengths, const at::Tensor& bias, int64_t window) {
  return decode_impl(q, q_pos, k_pool, v_pool, pos_pool, tables, lengths, window, at::Tensor(), bias);
}

at::Tensor probs_for(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& tables) {
  const int64_t Hkv = tables.size(1);
  return at::empty({q.size(0), Hkv, q.size(1) / Hkv, tables.size(2) * k_pool.size(1)}, q.options().dtype(at::kFloat));
}

// paged_decode and the probabilities [B, Hkv, group, nb * block_size] float32 (see the header).
std::tuple<at::Tensor, at::Tensor> paged_decode_probs(const at::Tensor& q, const at::Tensor& q_pos,
                                                      const at::Tensor& k_pool, const at::Tensor& v_pool,
                                                      const at::Tensor& pos_pool, const at::Tensor& tables,
                                                      const at::Tensor& lengths, int64_t window) {
  auto probs = probs_for(q, k_pool, tables);
  auto out = decode_impl(q, q_pos, k_pool, v_pool, pos_pool, tables, lengths, window, probs, at::Tensor());
  return {out, probs};
}

// paged_decode_bias and the probabilities of the biased softmax.
std::tuple<at::Tensor, at::Tensor> paged_decode_bias_probs(const at::Tensor& q, const at::Tensor& q_pos,
                                                           const at::Tensor& k_pool, const at::Tensor& v_pool,
                                                           const at::Tensor& pos_pool, const at::Tensor& tables,
                                                           const at::Tensor& lengths, const at::Tensor& bias,
                                                           int64_t window) {
  auto probs = probs_for(q, k_pool, tables);
  auto out = decode_impl(q, q_pos, k_pool, v_pool, pos_pool, tables, lengths, window, probs, bias);
  return {out, probs};
}

// reference.write_kv in one call: slots [H, T] flat slot ids of one layer's kv-heads, k and v
// [T, H, D] in the pools' dtype, positions [T]. (The twin's three scatters cost more than the copy.)
void write_kv(at::Tensor k_pool, at::Tensor v_pool, at::Tensor pos_pool, const at::Tensor& slots, const at::Tensor& k,
              const at::Tensor& v, const at::Tensor& positions) {
  TORCH_CHECK(k.scalar_type() == k_pool.scalar_type() && v.scalar_type() == v_pool.scalar_type(),
              "write_kv: k and v must be in the pools' dtype");
  TORCH_CHECK(k_pool.stride(2) == 1 && v_pool.stride(2) == 1 && pos_pool.scalar_type() == at::kInt,
              "write_kv: pools need contiguous rows and int32 positions");
  const auto sl = slots.to(at::kLong).contiguous();
  const auto pos = positions.to(at::kLong).contiguous();
  const auto kc = k.contiguous(), vc = v.contiguous();
  const int64_t H = slots.size(0), T = slots.size(1), D = k.size(2), block_size = k_pool.size(1);
  const int64_t item = k.element_size(), row_bytes = D * item;
  const int64_t* sl_ptr = sl.data_ptr<int64_t>();
  const int64_t* pos_ptr = pos.data_ptr<int64_t>();
  char* k_dst = static_cast<char*>(k_pool.data_ptr());
  char* v_dst = static_cast<char*>(v_pool.data_ptr());
  int32_t* pos_dst = pos_pool.data_ptr<int32_t>();
  const char* k_src = static_cast<const char*>(kc.data_ptr());
  const char* v_src = static_cast<const char*>(vc.data_ptr());
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t slot = sl_ptr[h * T + t], block = slot / block_size, offset = slot % block_size;
      const int64_t src = (t * H + h) * D * item;
      std::memcpy(k_dst + (block * k_pool.stride(0) + offset * k_pool.stride(1)) * item, k_src + src, row_bytes);
      std::memcpy(v_dst + (block * v_pool.stride(0) + offset * v_pool.stride(1)) * item, v_src + src, row_bytes);
      pos_dst[block * pos_pool.stride(0) + offset * pos_pool.stride(1)] = static_cast<int32_t>(pos_ptr[t]);
    }
  }
}

}  // namespace

TORCH_LIBRARY(nanokv_cpu, m) {
  m.def("paged_decode(Tensor q, Tensor q_pos, Tensor k_pool, Tensor v_pool, Tensor pos_pool, Tensor tables, "
        "Tensor lengths, int window) -> Tensor");
  m.def("paged_decode_probs(Tensor q, Tensor q_pos, Tensor k_pool, Tensor v_pool, Tensor pos_pool, Tensor tables, "
        "Tensor lengths, int window) -> (Tensor, Tensor)");
  m.def("paged_decode_bias(Tensor q, Tensor q_pos, Tensor k_pool, Tensor v_pool, Tensor pos_pool, Tensor tables, "
        "Tensor lengths, Tensor bias, int window) -> Tensor");
  m.def("paged_decode_bias_probs(Tensor q, Tensor q_pos, Tensor k_pool, Tensor v_pool, Tensor pos_pool, "
        "Tensor tables, Tensor lengths, Tensor bias, int window) -> (Tensor, Tensor)");
  m.def("write_kv(Tensor(a!) k_pool, Tensor(b!) v_pool, Tensor(c!) pos_pool, Tensor slots, Tensor k, Tensor v, "
        "Tensor positions) -> ()");
}

TORCH_LIBRARY_IMPL(nanokv_cpu, CPU, m) {
  m.impl("paged_decode", paged_decode);
  m.impl("paged_decode_probs", paged_decode_probs);
  m.impl("paged_decode_bias", paged_decode_bias);
  m.impl("paged_decode_bias_probs", paged_decode_bias_probs);
  m.impl("write_kv", write_kv);
}
