// Quest's page scoring and page selection for the CPU, compiled at first use by kernels/cpu.py.
//
// A Quest decode step (nanokv/methods/quest.py) reads only the top pages of each kv-head. Every
// page (a cache block) carries the per-channel min and max of its keys, kmin and kmax [N, D]. For
// a query head q the page's bound is sum_c max(q_c * kmax_c, q_c * kmin_c), which no key of the
// page can beat in q . k; a kv-head ranks its pages by the largest bound over its query heads.
//
// In plain torch (reference.page_scores, then reference.quest_pages: a topk, a sort and a gather
// to build the reduced tables) that is ~25 tensor ops over [B, Hkv, group, nb, D] temporaries per
// layer, several times the cost of the attention over the pages kept. Here one task per
// (sequence, kv-head) scores its held pages (its bounds rows are read once for all the group's
// query heads) and picks them in the same pass:
//   - a head holding at most `pages` pages reads them all;
//   - otherwise the newest page (the only partial one, and the one holding the current token)
//     is always read, and the other pages-1 are the highest bounds among the rest; a tie goes to
//     the older page (torch.topk leaves ties unspecified; random float bounds have none);
//   - the picked blocks are written in their table order, -1 after, and the head's new length is
//     (picked - 1) whole pages plus what the newest page holds.
// Numerics: float32 sums (the twin upcasts too), so scores agree to the summation order.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu_common.h"

namespace {

// Bounds of one kv-head's pages: q [group, D] float32; the head's table row `table` of `count`
// entries -> scores[count] (-inf for a -1 entry). lo and hi are D floats of scratch.
template <typename T>
void score_pages(const float* q, int64_t group, int64_t D, const T* kmin, const T* kmax, int64_t row_stride,
                 const int64_t* table, int64_t count, float* lo, float* hi, float* scores) {
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < count; ++i) {
    const int64_t block = table[i];
    if (block < 0) {
      scores[i] = neg_inf;
      continue;
    }
    const T* low = kmin + block * row_stride;
    const T* high = kmax + block * row_stride;
    for (int64_t c = 0; c < D; ++c) {
      lo[c] = widen(low[c]);
      hi[c] = widen(high[c]);
    }
    float best = neg_inf;
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = q + g * D;
      float sum = 0.f;
      for (int64_t c = 0; c < D; ++c) sum += std::max(qg[c] * hi[c], qg[c] * lo[c]);
      best = std::max(best, sum);
    }
    scores[i] = best;
  }
}

// The shared checks and conversions of both ops.
struct Inputs {
  at::Tensor q, tab;
  int64_t B, Hq, D, Hkv, nb, group;
};

Inputs prepare(const at::Tensor& q, const at::Tensor& kmin, const at::Tensor& kmax, const at::Tensor& tables,
               const char* name) {
  TORCH_CHECK(q.dim() == 3 && tables.dim() == 3 && kmin.dim() == 2, name, ": bad ranks");
  TORCH_CHECK(kmin.scalar_type() == kmax.scalar_type() && kmin.strides() == kmax.strides() && kmin.stride(1) == 1,
              name, ": kmin and kmax need one dtype, the same strides and contiguous rows");
  Inputs in;
  in.q = q.to(at::kFloat).contiguous();
  in.tab = tables.to(at::kLong).contiguous();
  in.B = q.size(0), in.Hq = q.size(1), in.D = q.size(2), in.Hkv = tables.size(1), in.nb = tables.size(2);
  TORCH_CHECK(in.Hq % in.Hkv == 0 && kmin.size(1) == in.D, name, ": shapes do not agree");
  in.group = in.Hq / in.Hkv;
  return in;
}

// reference.page_scores: q [B, Hq, D]; kmin, kmax [N, D]; tables [B, Hkv, nb] -> [B, Hkv, nb] float32.
at::Tensor page_scores(const at::Tensor& q, const at::Tensor& kmin, const at::Tensor& kmax, const at::Tensor& tables) {
  const Inputs in = prepare(q, kmin, kmax, tables, "page_scores");
  auto out = at::empty({in.B, in.Hkv, in.nb}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, kmin.scalar_type(), "page_scores", [&] {
    const scalar_t* lo_ptr = kmin.data_ptr<scalar_t>();
    const scalar_t* hi_ptr = kmax.data_ptr<scalar_t>();
    at::parallel_for(0, in.B * in.Hkv, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> lo(in.D), hi(in.D);
      for (int64_t head = begin; head < end; ++head) {
        score_pages(in.q.data_ptr<float>() + head * in.group * in.D, in.group, in.D, lo_ptr, hi_ptr, kmin.stride(0),
                    in.tab.data_ptr<int64_t>() + head * in.nb, in.nb, lo.data(), hi.data(),
                    out.data_ptr<float>() + head * in.nb);
      }
    });
  });
  return out;
}

// One Quest step's reduced tables: q, kmin, kmax, tables as page_scores; lengths [B, Hkv] the
// tokens each head holds (its pages are the first ceil(length / block_size) of its row); `pages`
// the pages each head reads -> (tables [B, Hkv, min(pages, nb)] of the picked blocks, -1 after;
// lengths [B, Hkv] of what they hold), in the dtypes given: reference.quest_pages' shapes.
std::tuple<at::Tensor, at::Tensor> select_pages(const at::Tensor& q, const at::Tensor& kmin, const at::Tensor& kmax,
                                                const at::Tensor& tables, const at::Tensor& lengths,
                                                int64_t block_size, int64_t pages) {
  const Inputs in = prepare(q, kmin, kmax, tables, "select_pages");
  TORCH_CHECK(pages >= 1 && block_size >= 1, "select_pages: pages and block_size must be positive");
  const auto len = lengths.to(at::kLong).contiguous();
  const int64_t heads = in.B * in.Hkv, width = std::min(pages, in.nb);
  auto picked = at::full({in.B, in.Hkv, width}, -1, in.tab.options());
  auto picked_len = at::empty({in.B, in.Hkv}, len.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, kmin.scalar_type(), "select_pages", [&] {
    const scalar_t* lo_ptr = kmin.data_ptr<scalar_t>();
    const scalar_t* hi_ptr = kmax.data_ptr<scalar_t>();
    const int64_t* tab_ptr = in.tab.data_ptr<int64_t>();
    const int64_t* len_ptr = len.data_ptr<int64_t>();
    int64_t* out_ptr = picked.data_ptr<int64_t>();
    int64_t* out_len = picked_len.data_ptr<int64_t>();
    at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> lo(in.D), hi(in.D), scores(in.nb);
      std::vector<int64_t> order(in.nb);
      for (int64_t head = begin; head < end; ++head) {
        const int64_t length = len_ptr[head];
        const int64_t held = std::min(in.nb, (length + block_size - 1) / block_size);
        const int64_t* row = tab_ptr + head * in.nb;
        int64_t* out = out_ptr + head * width;
        int64_t count = 0;
        if (held <= pages) {  // every page: nothing to score
          for (; count < held; ++count) out[count] = row[count];
        } else {
          // the older pages compete for pages - 1 places; the newest is read regardless
          const int64_t older = held - 1;
          score_pages(in.q.data_ptr<float>() + head * in.group * in.D, in.group, in.D, lo_ptr, hi_ptr,
                      kmin.stride(0), row, older, lo.data(), hi.data(), scores.data());
          for (int64_t i = 0; i < older; ++i) order[i] = i;
          const auto higher = [&](int64_t a, int64_t b) {
            return scores[a] > scores[b] || (scores[a] == scores[b] && a < b);
          };
          std::nth_element(order.begin(), order.begin() + (pages - 1), order.begin() + older, higher);
          std::sort(order.begin(), order.begin() + (pages - 1));  // back to table order
          for (; count < pages - 1; ++count) out[count] = row[order[count]];
          out[count++] = row[older];
        }
        // whole pages, then the newest page's tokens
        out_len[head] = count == 0 ? 0 : (count - 1) * block_size + length - (held - 1) * block_size;
      }
    });
  });
  return {picked.to(tables.scalar_type()), picked_len.to(lengths.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nanokv_cpu, m) {
  m.def("page_scores(Tensor q, Tensor kmin, Tensor kmax, Tensor tables) -> Tensor");
  m.def("quest_select(Tensor q, Tensor kmin, Tensor kmax, Tensor tables, Tensor lengths, int block_size, "
        "int pages) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nanokv_cpu, CPU, m) {
  m.impl("page_scores", page_scores);
  m.impl("quest_select", select_pages);
}
