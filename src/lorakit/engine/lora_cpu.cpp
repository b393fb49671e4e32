// The multi-adapter LoRA update on a CPU, reading every row's factors straight from the adapter slots.
//
// Token row i carries K (slot, weight) pairs (slot[i, j] < 0: an unused pair; a row with none is left
// untouched): one adapter at weight 1, or an exact mixture of adapters. For each pair j with slot
// s = slot[i, j] and weight w = weight[i, j], and each projection p of a fused group (columns
// [lo_p, hi_p) of the output):
//
//     u_p  = w * scale[s, p] * A[s, p, :r, :] x_i      (r)        shrink: r dot products of length `in`
//     y_i[lo_p:hi_p] += u_p^T Bt[s, :r, lo_p:hi_p]     (hi-lo)    expand: the r rows of B^T, weighted
//
// so y_i += sum_j w_ij s_j (x_i A_j^T) B_j^T, the mixture's exact update, with no merged copy.
//
// Shapes: y (..., out) fp32, updated in place; x (..., in) fp32, N rows in all; A (S, P, R, in) and
// Bt (S, R, out) in fp32, bf16 or fp16 (widened to fp32 as they are read; every sum is in fp32); scale
// (S, P) fp32; part_end (P,) the cumulative out widths; slot (N, K) int64 and weight (N, K) fp32; r <= R
// the rank the batch needs (smaller ranks are zero-padded).
//
// Decoding is bound by reading the factors (each row has its own), so the kernel reads each factor once,
// in order, and never copies it: no gather. Rows are split over the threads of PyTorch's own pool. Each
// row's sums run in a fixed order (its pairs in order) whatever the other rows are, so a request's result
// does not depend on what it is batched with; a weight of 1 leaves the scale exact.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// 16 fp32 lanes as a GCC/Clang vector: one AVX-512 register, two AVX2 ones, or four SSE ones.
typedef float f32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef _Float16 f16x16 __attribute__((vector_size(32)));
constexpr int64_t kLanes = 16;

inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline f32x16 load16(const uint16_t* p) {  // bf16 -> fp32: the bf16 bits are the top half of the fp32 ones
  u16x16 h;
  std::memcpy(&h, p, sizeof h);
  u32x16 w = __builtin_convertvector(h, u32x16) << 16;
  f32x16 v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}
inline f32x16 load16(const _Float16* p) {  // fp16 -> fp32 with the hardware conversion where there is one
#if defined(__AVX512F__)
  return (f32x16)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__F16C__)
  const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  f32x16 v;
  std::memcpy(&v, &lo, sizeof lo);
  std::memcpy(reinterpret_cast<char*>(&v) + sizeof lo, &hi, sizeof hi);
  return v;
#else
  f16x16 h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, f32x16);
#endif
}
inline float widen(float v) { return v; }
inline float widen(_Float16 v) { return float(v); }
inline float widen(uint16_t bf16) {
  uint32_t bits = uint32_t(bf16) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}
// The last `count` < 16 values, zero-filled: tails go through the same vector arithmetic as the rest, so
// fp32, bf16 and fp16 slots holding the same values give the same bits.
template <typename T>
inline f32x16 load_tail(const T* p, int64_t count) {
  f32x16 v = {};
  for (int64_t l = 0; l < count; ++l) v[l] = widen(p[l]);
  return v;
}
inline float lane_sum(f32x16 v) {
  float total = 0;
  for (int64_t l = 0; l < kLanes; ++l) total += v[l];
  return total;
}

// Prefetch the cache line `ahead` elements past p (the same place in the next row's factors), so the next
// row's factors stream in while this row computes; ahead == 0: no next row.
template <typename T>
inline void prefetch_ahead(const T* p, int64_t ahead) {
  if (ahead) __builtin_prefetch(p + ahead, 0, 3);
}

// Up to kTokens token rows that carry the same pairs (the tokens of one prompt, or several sequences on
// one adapter or mixture) are computed together, each factor vector loaded once for all of them. A token's
// sums run in the same order however many are computed with it.
constexpr int kTokens = 4;

// out[t * out_stride + q] = a[q, :] . x[t, :] for NT token rows of x and Q rows of a (row stride n); every
// vector of a is loaded once for all NT tokens
template <typename T, int NT, int Q>
void shrink_rows(const T* a, const float* x, int64_t n, float* out, int64_t out_stride, int64_t ahead) {
  f32x16 sums[NT][Q] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    f32x16 av[Q];
    for (int q = 0; q < Q; ++q) {
      prefetch_ahead(a + q * n + k, ahead);
      av[q] = load16(a + q * n + k);
    }
    for (int t = 0; t < NT; ++t) {
      const f32x16 xv = load16(x + t * n + k);
      for (int q = 0; q < Q; ++q) sums[t][q] += av[q] * xv;
    }
  }
  if (k < n) {
    f32x16 av[Q];
    for (int q = 0; q < Q; ++q) av[q] = load_tail(a + q * n + k, n - k);
    for (int t = 0; t < NT; ++t) {
      const f32x16 xv = load_tail(x + t * n + k, n - k);
      for (int q = 0; q < Q; ++q) sums[t][q] += av[q] * xv;
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int q = 0; q < Q; ++q) out[t * out_stride + q] = lane_sum(sums[t][q]);
}

// out[t * out_stride + j] = a[j, :] . x[t, :] for the `rows` rows of a, four at a time
template <typename T, int NT>
void shrink(const T* a, const float* x, int64_t n, int64_t rows, float* out, int64_t out_stride, int64_t ahead) {
  int64_t j = 0;
  for (; j + 4 <= rows; j += 4) shrink_rows<T, NT, 4>(a + j * n, x, n, out + j, out_stride, ahead);
  switch (rows - j) {
    case 3: shrink_rows<T, NT, 3>(a + j * n, x, n, out + j, out_stride, ahead); break;
    case 2: shrink_rows<T, NT, 2>(a + j * n, x, n, out + j, out_stride, ahead); break;
    case 1: shrink_rows<T, NT, 1>(a + j * n, x, n, out + j, out_stride, ahead); break;
    default: break;
  }
}

// y[t, lo:hi] += sum_j u[t, j] * bt[j, lo:hi] for NT token rows, summed over j = 0..r-1 before touching y
template <typename T, int NT>
void expand(float* y, int64_t y_stride, const float* u, int64_t u_stride, const T* bt, int64_t bt_stride,
            int64_t r, int64_t lo, int64_t hi, int64_t ahead) {
  int64_t o = lo;
  for (; o + kLanes <= hi; o += kLanes) {
    f32x16 acc[NT] = {};
    for (int64_t j = 0; j < r; ++j) {
      prefetch_ahead(bt + j * bt_stride + o, ahead);
      const f32x16 bv = load16(bt + j * bt_stride + o);
      for (int t = 0; t < NT; ++t) acc[t] += u[t * u_stride + j] * bv;
    }
    for (int t = 0; t < NT; ++t) {
      const f32x16 sum = load16(y + t * y_stride + o) + acc[t];
      std::memcpy(y + t * y_stride + o, &sum, sizeof sum);
    }
  }
  if (o < hi) {
    f32x16 acc[NT] = {};
    for (int64_t j = 0; j < r; ++j) {
      const f32x16 bv = load_tail(bt + j * bt_stride + o, hi - o);
      for (int t = 0; t < NT; ++t) acc[t] += u[t * u_stride + j] * bv;
    }
    for (int t = 0; t < NT; ++t)
      for (int64_t l = 0; l < hi - o; ++l) y[t * y_stride + o + l] += acc[t][l];
  }
}

struct Problem {
  int64_t in, out, parts, R, r, K;
  const float* scale;
  const int64_t* part_end;
};

// The update of NT consecutive token rows (x, y) by slot s at weight w; u: NT * parts * r scratch
template <typename T, int NT>
void add_block(const Problem& pb, float* y, const float* x, const T* a, const T* bt, int64_t s, float w, float* u,
               int64_t ahead_a, int64_t ahead_b) {
  const int64_t width = pb.parts * pb.r;
  for (int64_t p = 0; p < pb.parts; ++p) {
    shrink<T, NT>(a + (s * pb.parts + p) * pb.R * pb.in, x, pb.in, pb.r, u + p * pb.r, width, ahead_a);
    const float factor = w * pb.scale[s * pb.parts + p];  // w == 1: the scale itself, exactly
    for (int t = 0; t < NT; ++t)
      for (int64_t j = 0; j < pb.r; ++j) u[t * width + p * pb.r + j] *= factor;
  }
  const T* bts = bt + s * pb.R * pb.out;
  for (int64_t p = 0; p < pb.parts; ++p)
    expand<T, NT>(y, pb.out, u + p * pb.r, width, bts, pb.out, pb.r, p ? pb.part_end[p - 1] : 0, pb.part_end[p],
                  ahead_b);
}

// Whether token rows i and k carry the same (slot, weight) pairs
inline bool same_pairs(const int64_t* slot, const float* weight, int64_t K, int64_t i, int64_t k) {
  return std::memcmp(slot + i * K, slot + k * K, K * sizeof(int64_t)) == 0 &&
         std::memcmp(weight + i * K, weight + k * K, K * sizeof(float)) == 0;
}

// The next slot other than s that this thread reads after pair j of the block at row i (nt rows), before
// row `end`; -1: none
inline int64_t next_other_slot(const int64_t* slot, int64_t K, int64_t i, int64_t j, int64_t nt, int64_t end,
                               int64_t s) {
  for (int64_t q = j + 1; q < K; ++q)
    if (slot[i * K + q] >= 0 && slot[i * K + q] != s) return slot[i * K + q];
  for (int64_t q = (i + nt) * K; q < end * K; ++q)
    if (slot[q] >= 0 && slot[q] != s) return slot[q];
  return -1;
}

template <typename T>
void add_lora(const Problem& pb, float* y, const float* x, const T* a, const T* bt, const int64_t* slot,
              const float* weight, int64_t rows) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> u(kTokens * pb.parts * pb.r);
    for (int64_t i = begin; i < end;) {
      int nt = 1;
      while (nt < kTokens && i + nt < end && same_pairs(slot, weight, pb.K, i, i + nt)) ++nt;
      float* yi = y + i * pb.out;
      const float* xi = x + i * pb.in;
      for (int64_t j = 0; j < pb.K; ++j) {
        const int64_t s = slot[i * pb.K + j];
        if (s < 0) continue;
        const float w = weight[i * pb.K + j];
        // the next other slot this thread reads: prefetched while this block computes
        const int64_t next = next_other_slot(slot, pb.K, i, j, nt, end, s);
        const int64_t ahead_a = next < 0 ? 0 : (next - s) * pb.parts * pb.R * pb.in;
        const int64_t ahead_b = next < 0 ? 0 : (next - s) * pb.R * pb.out;
        switch (nt) {
          case 1: add_block<T, 1>(pb, yi, xi, a, bt, s, w, u.data(), ahead_a, ahead_b); break;
          case 2: add_block<T, 2>(pb, yi, xi, a, bt, s, w, u.data(), ahead_a, ahead_b); break;
          case 3: add_block<T, 3>(pb, yi, xi, a, bt, s, w, u.data(), ahead_a, ahead_b); break;
          default: add_block<T, 4>(pb, yi, xi, a, bt, s, w, u.data(), ahead_a, ahead_b); break;
        }
      }
      i += nt;
    }
  });
}

void add_lora_(torch::Tensor y, torch::Tensor x, torch::Tensor a, torch::Tensor bt, torch::Tensor scale,
               torch::Tensor part_end, torch::Tensor slot, torch::Tensor weight, int64_t r) {
  TORCH_CHECK(y.is_contiguous() && x.is_contiguous() && a.is_contiguous() && bt.is_contiguous() &&
              scale.is_contiguous() && part_end.is_contiguous() && slot.is_contiguous() && weight.is_contiguous(),
              "contiguous tensors only");
  TORCH_CHECK(y.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat && scale.scalar_type() == at::kFloat &&
              weight.scalar_type() == at::kFloat, "y, x, scale and weight must be fp32");
  TORCH_CHECK(a.scalar_type() == bt.scalar_type(), "A and B^T must share a dtype");
  TORCH_CHECK(slot.scalar_type() == at::kLong && part_end.scalar_type() == at::kLong, "slot and part_end are int64");
  TORCH_CHECK(slot.dim() == 2 && weight.sizes() == slot.sizes(), "slot and weight are (rows, pairs)");
  const int64_t in = x.size(-1), out = y.size(-1), rows = in ? x.numel() / in : 0, parts = a.size(1), R = a.size(2);
  TORCH_CHECK(out && y.numel() / out == rows && slot.size(0) == rows && a.size(3) == in && bt.size(1) == R &&
                  bt.size(2) == out && part_end.size(0) == parts && r >= 0 && r <= R,
              "shapes do not match");
  const Problem pb{in, out, parts, R, r, slot.size(1), scale.data_ptr<float>(), part_end.data_ptr<int64_t>()};
  const int64_t* slots = slot.data_ptr<int64_t>();
  const float* weights = weight.data_ptr<float>();
  if (a.scalar_type() == at::kBFloat16) {
    add_lora(pb, y.data_ptr<float>(), x.data_ptr<float>(), static_cast<const uint16_t*>(a.data_ptr()),
             static_cast<const uint16_t*>(bt.data_ptr()), slots, weights, rows);
  } else if (a.scalar_type() == at::kHalf) {
    add_lora(pb, y.data_ptr<float>(), x.data_ptr<float>(), static_cast<const _Float16*>(a.data_ptr()),
             static_cast<const _Float16*>(bt.data_ptr()), slots, weights, rows);
  } else {
    TORCH_CHECK(a.scalar_type() == at::kFloat, "A and B^T must be fp32, bf16 or fp16");
    add_lora(pb, y.data_ptr<float>(), x.data_ptr<float>(), a.data_ptr<float>(), bt.data_ptr<float>(), slots,
             weights, rows);
  }
}

}  // namespace

// paged_attention_cpu.cpp, compiled into the same module
torch::Tensor paged_attention(torch::Tensor q, torch::Tensor position, torch::Tensor keys, torch::Tensor values,
                              torch::Tensor table, double scale);
// linear_panels_cpu.cpp, compiled into the same module
torch::Tensor linear_panels(torch::Tensor x, torch::Tensor panels, int64_t out, c10::optional<torch::Tensor> bias);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("add_lora_", &add_lora_, "y += the LoRA update of each row's (slot, weight) pairs (in place)");
  m.def("paged_attention", &paged_attention,
        "a few queries per sequence attending to its keys and values in the blocks its table names");
  m.def("linear_panels", &linear_panels, "x W^T + b with W held in panels of 64 outputs, each read once",
        py::arg("x"), py::arg("panels"), py::arg("out"), py::arg("bias") = py::none());
}
