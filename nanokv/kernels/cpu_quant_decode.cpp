// Decode attention over a quantized KV cache (KIVI's layout) for the CPU, compiled at first use by
// kernels/cpu.py: the twin of reference.quantized_decode_attention and of the Triton kernel in
// quant_decode.py.
//
// Each (sequence, kv-head) holds its oldest tokens in quantized blocks and its newest ones (the
// residual) in full-precision blocks. The plain-torch twin dequantizes every quantized block of
// every head to float32 at every step: it writes, then rereads, 16 / bits times the bytes the
// codes hold, and on a CPU that made `kivi` decode 6x slower than `full`. Here each task (a
// sequence's kv-head, or a split of it) walks its tokens 64 at a time, as cpu_decode.cpp does:
// a token's key codes are unpacked to floats and scored at once for the group's query heads, its
// value codes dequantized (code * scale + zero) into a chunk buffer that stays in the core's L1/L2,
// and the chunk is summed into V with an online softmax. Only the packed codes and their float16
// scales come from memory. KIVI's per-channel key scales fold into q, once per group of G tokens:
// q . (c * scale + zero) = (q * scale) . c + q . zero, so keys are only unpacked (9% faster).
//
// Layout (nanokv/kernels/quant.py): channel d's code sits in byte d / (8 / bits) of its token's
// row, at bit (d % (8 / bits)) * bits. Keys per channel (KIVI) share one scale and zero per
// channel across a group of G tokens; values (and per-token keys) one per token across a group
// of G channels. Every field is a strided view into one byte arena (quant_pool.py keeps all the
// fields of a block in one row), so a token is addressed as block * stride(0) + row * stride(1).
//
// Masking: quantized tokens are all older than the query and carry no positions, so the count
// qlens alone masks them; residual slots are seen when k_pos <= q_pos (no window: the engine
// refuses quantized caches on sliding-window layers), as in the twin.
//
// Numerics: float32 throughout. Dequantized values are the twin's (one float32 multiply-add of the
// same code, scale and zero; at most one rounding apart); folded scores and the sums run in
// another order, so outputs agree to float32 rounding. The output is float32; kernels/cpu.py casts it to q's dtype.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_common.h"

namespace {

// Unpacking in the packed order. Channel d's code sits in byte d / per_byte at bit (d % per_byte) *
// bits: unpacked in channel order, neighbouring lanes would need different bytes and shifts, and
// the compiler did not vectorize that (4-bit took twice the time of 8-bit). So the quantized part
// works in "unpacked order": all channels at shift 0 (d = 0, per_byte, 2 per_byte, ...), then all
// at shift `bits`, and so on; position s * D / per_byte + j holds channel j * per_byte + s. Each
// run is one shift and mask over contiguous bytes. A dot product does not care about the order
// as long as q is permuted alike; V's weighted sum is accumulated in that order and put back in
// channel order once, at the end of a task. (8 bits: one byte per code, the order is the identity.)
template <int BITS>
inline int64_t unpacked_at(int64_t d, int64_t D) {
  constexpr int per_byte = 8 / BITS;
  return (d % per_byte) * (D / per_byte) + d / per_byte;
}

// dst [D] (unpacked order) = src [D] (channel order) widened: position s * D / per_byte + j takes
// channel j * per_byte + s, a strided read the compiler vectorizes (a per-channel permutation did not)
template <int BITS, int FIXED_D>
inline void widen_unpacked(const c10::Half* src, int64_t head_dim, float* dst) {
  constexpr int per_byte = 8 / BITS;
  const int64_t Dp = (FIXED_D > 0 ? FIXED_D : head_dim) / per_byte;
  for (int s = 0; s < per_byte; ++s) {
#pragma omp simd
    for (int64_t j = 0; j < Dp; ++j) dst[s * Dp + j] = static_cast<float>(src[j * per_byte + s]);
  }
}

// dst [D] (unpacked order) = row's codes as floats
template <int BITS, int FIXED_D>
inline void unpack(const uint8_t* row, int64_t head_dim, float* dst) {
  constexpr int per_byte = 8 / BITS, mask = (1 << BITS) - 1;
  const int64_t Dp = (FIXED_D > 0 ? FIXED_D : head_dim) / per_byte;
  for (int s = 0; s < per_byte; ++s) {
#pragma omp simd
    for (int64_t j = 0; j < Dp; ++j) dst[s * Dp + j] = static_cast<float>((row[j] >> (s * BITS)) & mask);
  }
}

// dst [D] (unpacked order) = row's codes * scale + zero, one float16 (scale, zero) per run of G
// channels (values, per-token keys). G is a multiple of per_byte, so channel j * per_byte + s is in
// group j / (G / per_byte) for every shift s: each group is a run of G / per_byte bytes.
template <int BITS, int FIXED_D>
inline void dequantize_per_token(const uint8_t* row, const c10::Half* scale, const c10::Half* zero, int64_t G,
                                 int64_t head_dim, float* dst) {
  constexpr int per_byte = 8 / BITS;
  const int64_t D = FIXED_D > 0 ? FIXED_D : head_dim, Dp = D / per_byte, Gp = G / per_byte;
  unpack<BITS, FIXED_D>(row, D, dst);  // whole rows: one long vector loop per shift
  for (int64_t g = 0; g < D / G; ++g) {
    const float sc = static_cast<float>(scale[g]), z = static_cast<float>(zero[g]);
    for (int s = 0; s < per_byte; ++s) {
      float* out = dst + s * Dp + g * Gp;
#pragma omp simd
      for (int64_t j = 0; j < Gp; ++j) out[j] = out[j] * sc + z;
    }
  }
}

// Where a field lives: base pointer, stride between blocks, stride between rows (in elements)
template <typename T>
struct Field {
  const T* data;
  int64_t block_stride, row_stride;
  const T* row(int64_t block, int64_t r) const { return data + block * block_stride + r * row_stride; }
};

struct Quantized {
  Field<uint8_t> k_codes, v_codes;
  Field<c10::Half> k_scale, k_zero, v_scale, v_zero;
  int64_t group_size, block_size;
  bool keys_per_channel;
};

template <typename T>
struct Residual {
  Field<T> k, v;
  Field<int32_t> pos;
  int64_t block_size;
};

struct Scratch {
  std::vector<float> q, k, v, scores, k_scale, k_zero, q_scaled, q_zero;
  std::vector<int32_t> pos;
};

// The online softmax over one chunk: k, v [n, D] float32, seen[i] whether token i counts (nullptr:
// all do). Running state acc [group, D], best [group], total [group] as in cpu_decode.cpp.
template <int FIXED_D>
void attend_chunk(const float* qf, const float* k, const float* v, const int32_t* pos, int64_t q_pos, int64_t n,
                  int64_t group, int64_t head_dim, float* scores, float* acc, float* best, float* total) {
  const int64_t D = FIXED_D > 0 ? FIXED_D : head_dim;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    const bool seen = pos == nullptr || pos[i] <= q_pos;
    for (int64_t j = 0; j < group; ++j) scores[j * CHUNK + i] = seen ? dot(qf + j * D, k + i * D, D) : neg_inf;
  }
  softmax_chunk<FIXED_D>(scores, v, n, group, D, acc, best, total);
}

// One task: quantized tokens [q_start, q_end) of a head (through qtable), then its residual slots
// [r_start, r_end) (through table), into partial = [acc | best | total] as in cpu_decode.cpp.
template <typename T, int KBITS, int VBITS, int FIXED_D>
void quant_part(const float* q, int64_t q_pos, const Quantized& quant, const int64_t* qtable, int64_t q_start,
                int64_t q_end, const Residual<T>& res, const int64_t* table, int64_t r_start, int64_t r_end,
                int64_t group, int64_t head_dim, float* partial, Scratch& scratch) {
  const int64_t D = FIXED_D > 0 ? FIXED_D : head_dim;
  float* acc = partial;
  float* best = partial + group * D;
  float* total = best + group;
  std::fill(acc, acc + group * D, 0.f);
  std::fill(best, best + group, -std::numeric_limits<float>::infinity());
  std::fill(total, total + group, 0.f);
  scratch.q.resize(group * D);
  scratch.k.resize(CHUNK * D);
  scratch.v.resize(CHUNK * D);
  scratch.pos.resize(CHUNK);
  scratch.scores.resize(group * CHUNK);
  scratch.q_scaled.resize(group * D);
  scratch.k_scale.resize(D);
  scratch.k_zero.resize(D);
  scratch.q_zero.resize(group);
  float *q_scaled = scratch.q_scaled.data(), *q_zero = scratch.q_zero.data();
  float *k_scale = scratch.k_scale.data(), *k_zero = scratch.k_zero.data();
  float *qf = scratch.q.data(), *k = scratch.k.data(), *v = scratch.v.data(), *scores = scratch.scores.data();
  const float sm_scale = 1.0f / std::sqrt(static_cast<float>(D));
  // q, the keys and acc in unpacked order for the quantized tokens
  for (int64_t j = 0; j < group; ++j)
    for (int64_t d = 0; d < D; ++d) qf[j * D + unpacked_at<KBITS>(d, D)] = q[j * D + d] * sm_scale;

  // Quantized tokens, a chunk at a time: each token's keys are unpacked and scored at once (the row
  // is still in L1), its values dequantized into the chunk's buffer; then the chunk is attended.
  // Per-channel key scales fold into q: q . (c * scale + zero) = (q * scale) . c + q . zero, so a
  // group of G tokens costs one multiply of q and its keys are only unpacked, not dequantized.
  const int64_t G = quant.group_size;
  int64_t folded_block = -1, folded_group = -1;  // whose scales q_scaled holds
  float* row = k;  // one token's unpacked keys
  for (int64_t c = q_start; c < q_end; c += CHUNK) {
    const int64_t n = std::min(CHUNK, q_end - c);
    for_each_run(qtable, c, c + n, quant.block_size, [&](int64_t block, int64_t first, int64_t i, int64_t run) {
      for (int64_t r = first; r < first + run; ++r, ++i) {
        if (quant.keys_per_channel) {
          if (block != folded_block || r / G != folded_group) {
            widen_unpacked<KBITS, FIXED_D>(quant.k_scale.row(block, r / G), D, k_scale);
            widen_unpacked<KBITS, FIXED_D>(quant.k_zero.row(block, r / G), D, k_zero);
            for (int64_t j = 0; j < group; ++j) {
#pragma omp simd
              for (int64_t u = 0; u < D; ++u) q_scaled[j * D + u] = qf[j * D + u] * k_scale[u];
              q_zero[j] = dot(qf + j * D, k_zero, D);
            }
            folded_block = block, folded_group = r / G;
          }
          unpack<KBITS, FIXED_D>(quant.k_codes.row(block, r), D, row);
          for (int64_t j = 0; j < group; ++j) scores[j * CHUNK + i] = dot(q_scaled + j * D, row, D) + q_zero[j];
        } else {
          dequantize_per_token<KBITS, FIXED_D>(quant.k_codes.row(block, r), quant.k_scale.row(block, r),
                                               quant.k_zero.row(block, r), G, D, row);
          for (int64_t j = 0; j < group; ++j) scores[j * CHUNK + i] = dot(qf + j * D, row, D);
        }
        dequantize_per_token<VBITS, FIXED_D>(quant.v_codes.row(block, r), quant.v_scale.row(block, r),
                                             quant.v_zero.row(block, r), G, D, v + i * D);
      }
    });
    softmax_chunk<FIXED_D>(scores, v, n, group, D, acc, best, total);
  }

  // acc (summed in the values' unpacked order) back in channel order: the residual's rows are read as
  // they are stored, with q in channel order
  if constexpr (VBITS != 8) {
    for (int64_t j = 0; j < group; ++j) {
      std::copy(acc + j * D, acc + (j + 1) * D, k);
      for (int64_t d = 0; d < D; ++d) acc[j * D + d] = k[unpacked_at<VBITS>(d, D)];
    }
  }
  if (r_start == r_end) return;
  for (int64_t j = 0; j < group; ++j)
    for (int64_t d = 0; d < D; ++d) qf[j * D + d] = q[j * D + d] * sm_scale;

  // The full-precision residual: gathered and widened as in cpu_decode.cpp, seen by position.
  int32_t* pos = scratch.pos.data();
  for (int64_t c = r_start; c < r_end; c += CHUNK) {
    const int64_t n = std::min(CHUNK, r_end - c);
    for_each_run(table, c, c + n, res.block_size, [&](int64_t block, int64_t slot, int64_t i, int64_t run) {
      for (int64_t r = 0; r < run; ++r) {
        const T* k_row = res.k.row(block, slot + r);
        const T* v_row = res.v.row(block, slot + r);
        float* k_dst = k + (i + r) * D;
        float* v_dst = v + (i + r) * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) k_dst[d] = widen(k_row[d]), v_dst[d] = widen(v_row[d]);
      }
      std::memcpy(pos + i, res.pos.row(block, slot), run * sizeof(int32_t));
    });
    attend_chunk<FIXED_D>(qf, k, v, pos, q_pos, n, group, D, scores, acc, best, total);
  }
}

template <typename T>
Field<T> field(const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 3 ? t.stride(2) == 1 : t.stride(1) == 1, "quantized_decode: inner dims must be contiguous");
  return {t.data_ptr<T>(), t.stride(0), t.dim() == 3 ? t.stride(1) : 1};
}

// q [B, Hq, D] float32; q_pos [B]; the QuantBlocks fields (codes uint8 [N, R, D * bits / 8] at k_bits
// and v_bits, a row possibly inside a wider one; scales and zeros float16); qtables [B, Hkv, nq],
// qlens [B, Hkv]; k_pool, v_pool [N, block_size, D], pos_pool [N, block_size] int32, tables [B, Hkv, nb], lengths [B, Hkv] -> [B, Hq, D] float32.
// Work is cut as in cpu_decode.cpp: with fewer heads than threads, each head's tokens (quantized
// then residual, as one list) are split across threads and merged after.
at::Tensor quantized_decode(const at::Tensor& q, const at::Tensor& q_pos, const at::Tensor& k_codes,
                            const at::Tensor& k_scale, const at::Tensor& k_zero, const at::Tensor& v_codes,
                            const at::Tensor& v_scale, const at::Tensor& v_zero, int64_t k_bits, int64_t v_bits,
                            int64_t group_size, bool keys_per_channel, const at::Tensor& qtables, const at::Tensor& qlens,
                            const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& pos_pool,
                            const at::Tensor& tables, const at::Tensor& lengths) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat, "quantized_decode: q must be float32 [B, Hq, D]");
  for (const int64_t bits : {k_bits, v_bits})
    TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "quantized_decode: bits must be 2, 4 or 8");
  TORCH_CHECK(k_bits >= v_bits, "quantized_decode: keys take at least the values' bits");
  TORCH_CHECK(k_codes.scalar_type() == at::kByte && v_codes.scalar_type() == at::kByte, "quantized_decode: codes are uint8");
  for (const auto* t : {&k_scale, &k_zero, &v_scale, &v_zero})
    TORCH_CHECK(t->scalar_type() == at::kHalf, "quantized_decode: scales and zeros must be float16");
  TORCH_CHECK(k_pool.scalar_type() == v_pool.scalar_type() && pos_pool.scalar_type() == at::kInt,
              "quantized_decode: K and V pools share a dtype, positions are int32");
  const auto qc = q.contiguous();
  const auto qp = q_pos.to(at::kLong).contiguous();
  const auto qtab = qtables.to(at::kLong).contiguous(), tab = tables.to(at::kLong).contiguous();
  const auto qlen = qlens.to(at::kLong).contiguous(), len = lengths.to(at::kLong).contiguous();
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = tables.size(1);
  const int64_t nq = qtables.size(2), nb = tables.size(2), R = k_codes.size(1), block_size = k_pool.size(1);
  const int64_t group = Hq / Hkv, heads = B * Hkv, G = group_size;
  TORCH_CHECK(Hq == group * Hkv && D % G == 0 && R % G == 0 && k_codes.size(2) * 8 == D * k_bits &&
                  v_codes.size(2) * 8 == D * v_bits,
              "quantized_decode: shapes do not match");
  const Quantized quant{field<uint8_t>(k_codes), field<uint8_t>(v_codes), field<c10::Half>(k_scale),
                        field<c10::Half>(k_zero), field<c10::Half>(v_scale), field<c10::Half>(v_zero), G, R,
                        keys_per_channel};
  const int64_t* qlen_ptr = qlen.data_ptr<int64_t>();
  const int64_t* len_ptr = len.data_ptr<int64_t>();
  // a head's tokens: min(qlen, nq * R) quantized, then min(length, nb * block_size) residual
  auto held = [&](int64_t head) {
    return std::min(qlen_ptr[head], nq * R) + std::min(len_ptr[head], nb * block_size);
  };
  int64_t longest = 0;
  for (int64_t head = 0; head < heads; ++head) longest = std::max(longest, held(head));
  constexpr int64_t SPLIT_MIN = 128;  // as cpu_decode.cpp: 4 tasks per thread, none under 128 tokens
  const int64_t wanted = (4 * at::get_num_threads() + heads - 1) / heads;
  const int64_t splits = std::max<int64_t>(1, std::min(wanted, longest / SPLIT_MIN));
  const int64_t split_len = std::max<int64_t>(1, (longest + splits - 1) / splits);
  auto out = at::empty({B, Hq, D}, q.options());
  std::vector<float> partials(heads * splits * group * (D + 2));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k_pool.scalar_type(), "quantized_decode", [&] {
    const Residual<scalar_t> res{field<scalar_t>(k_pool), field<scalar_t>(v_pool), field<int32_t>(pos_pool),
                                 block_size};
    using Part = void (*)(const float*, int64_t, const Quantized&, const int64_t*, int64_t, int64_t,
                          const Residual<scalar_t>&, const int64_t*, int64_t, int64_t, int64_t, int64_t, float*,
                          Scratch&);
    // one copy per (key bits, value bits), keys at least as wide (the unpacking's shifts are
    // constants), unrolled for head sizes 64 and 128
    auto pick = [&](auto k_tag, auto v_tag) -> Part {
      constexpr int KBITS = decltype(k_tag)::value, VBITS = decltype(v_tag)::value;
      return D == 64 ? quant_part<scalar_t, KBITS, VBITS, 64> : D == 128 ? quant_part<scalar_t, KBITS, VBITS, 128>
                                                                         : quant_part<scalar_t, KBITS, VBITS, 0>;
    };
    using Two = std::integral_constant<int, 2>;
    using Four = std::integral_constant<int, 4>;
    using Eight = std::integral_constant<int, 8>;
    const Part part = k_bits == 2   ? pick(Two{}, Two{})
                      : k_bits == 4 ? (v_bits == 2 ? pick(Four{}, Two{}) : pick(Four{}, Four{}))
                                    : (v_bits == 2 ? pick(Eight{}, Two{}) : v_bits == 4 ? pick(Eight{}, Four{})
                                                                                        : pick(Eight{}, Eight{}));
    const float* q_ptr = qc.data_ptr<float>();
    const int64_t* qp_ptr = qp.data_ptr<int64_t>();
    const int64_t* qtab_ptr = qtab.data_ptr<int64_t>();
    const int64_t* tab_ptr = tab.data_ptr<int64_t>();
    const int64_t tasks = heads * splits;
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      Scratch scratch;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t head = task / splits, split = task % splits, b = head / Hkv, h = head % Hkv;
        const int64_t nquant = std::min(qlen_ptr[head], nq * R), total = held(head);
        const int64_t start = std::min(total, split * split_len), stop = std::min(total, start + split_len);
        // [start, stop) of the head's list: its quantized part, then its residual part
        part(q_ptr + (b * Hq + h * group) * D, qp_ptr[b], quant, qtab_ptr + head * nq, std::min(start, nquant),
             std::min(stop, nquant), res, tab_ptr + head * nb, std::max(start, nquant) - nquant,
             std::max(stop, nquant) - nquant, group, D, partials.data() + task * group * (D + 2), scratch);
      }
    });
  });
  float* out_ptr = out.data_ptr<float>();
  for (int64_t head = 0; head < heads; ++head) {
    const int64_t b = head / Hkv, h = head % Hkv;
    merge_parts(partials.data() + head * splits * group * (D + 2), splits, group, D, out_ptr + (b * Hq + h * group) * D);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nanokv_cpu, m) {
  m.def("quantized_decode(Tensor q, Tensor q_pos, Tensor k_codes, Tensor k_scale, Tensor k_zero, Tensor v_codes, "
        "Tensor v_scale, Tensor v_zero, int k_bits, int v_bits, int group_size, bool keys_per_channel, Tensor qtables, "
        "Tensor qlens, Tensor k_pool, Tensor v_pool, Tensor pos_pool, Tensor tables, Tensor lengths) -> Tensor");
}

TORCH_LIBRARY_IMPL(nanokv_cpu, CPU, m) {
  m.impl("quantized_decode", quantized_decode);
}
