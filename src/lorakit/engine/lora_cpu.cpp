// The multi-adapter LoRA update on a CPU, reading every row's factors straight from the adapter slots.
//
// For token row i with adapter slot s = slot[i] (s < 0: no adapter, row untouched), and each projection
// p of a fused group (columns [lo_p, hi_p) of the output):
//
//     u_p  = scale[s, p] * A[s, p, :r, :] x_i          (r)        shrink: r dot products of length `in`
//     y_i[lo_p:hi_p] += u_p^T Bt[s, :r, lo_p:hi_p]     (hi-lo)    expand: the r rows of B^T, weighted
//
// Shapes: y (..., out) fp32, updated in place; x (..., in) fp32, N rows in all; A (S, P, R, in) and Bt (S, R, out) in fp32
// or bf16 (widened to fp32 as they are read; every sum is in fp32); scale (S, P) fp32; part_end (P,) the
// cumulative out widths; slot (N,) int64; r <= R the rank the batch needs (smaller ranks are zero-padded).
//
// Decoding is bound by reading the factors (each row has its own), so the kernel reads each factor once,
// in order, and never copies it: no gather. Rows are split over the threads of PyTorch's own pool. Each
// row's sums run in a fixed order whatever the other rows are, so a request's result does not depend on
// what it is batched with.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// 16 fp32 lanes as a GCC/Clang vector: one AVX-512 register, two AVX2 ones, or four SSE ones.
typedef float f32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
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
inline float widen(float v) { return v; }
inline float widen(uint16_t bf16) {
  uint32_t bits = uint32_t(bf16) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
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

// out[j] = a[j, :] . x for the `rows` rows of a (row stride n), four rows per pass over x
template <typename T>
void dot_rows(const T* a, const float* x, int64_t n, int64_t rows, float* out, int64_t ahead) {
  int64_t j = 0;
  for (; j + 4 <= rows; j += 4) {
    const T *a0 = a + j * n, *a1 = a0 + n, *a2 = a1 + n, *a3 = a2 + n;
    f32x16 s0 = {}, s1 = {}, s2 = {}, s3 = {};
    int64_t k = 0;
    for (; k + kLanes <= n; k += kLanes) {
      prefetch_ahead(a0 + k, ahead), prefetch_ahead(a1 + k, ahead), prefetch_ahead(a2 + k, ahead);
      prefetch_ahead(a3 + k, ahead);
      const f32x16 xv = load16(x + k);
      s0 += load16(a0 + k) * xv;
      s1 += load16(a1 + k) * xv;
      s2 += load16(a2 + k) * xv;
      s3 += load16(a3 + k) * xv;
    }
    float t0 = lane_sum(s0), t1 = lane_sum(s1), t2 = lane_sum(s2), t3 = lane_sum(s3);
    for (; k < n; ++k) {
      t0 += widen(a0[k]) * x[k];
      t1 += widen(a1[k]) * x[k];
      t2 += widen(a2[k]) * x[k];
      t3 += widen(a3[k]) * x[k];
    }
    out[j] = t0, out[j + 1] = t1, out[j + 2] = t2, out[j + 3] = t3;
  }
  for (; j < rows; ++j) {
    const T* aj = a + j * n;
    f32x16 s = {};
    int64_t k = 0;
    for (; k + kLanes <= n; k += kLanes) s += load16(aj + k) * load16(x + k);
    float t = lane_sum(s);
    for (; k < n; ++k) t += widen(aj[k]) * x[k];
    out[j] = t;
  }
}

// y[lo:hi] += sum_j u[j] * bt[j * stride + lo : j * stride + hi], summed over j = 0..r-1 before touching y
template <typename T>
void expand(float* y, const float* u, const T* bt, int64_t stride, int64_t r, int64_t lo, int64_t hi,
            int64_t ahead) {
  int64_t o = lo;
  for (; o + kLanes <= hi; o += kLanes) {
    f32x16 acc = {};
    for (int64_t j = 0; j < r; ++j) {
      prefetch_ahead(bt + j * stride + o, ahead);
      acc += u[j] * load16(bt + j * stride + o);
    }
    const f32x16 sum = load16(y + o) + acc;
    std::memcpy(y + o, &sum, sizeof sum);
  }
  for (; o < hi; ++o) {
    float acc = 0;
    for (int64_t j = 0; j < r; ++j) acc += u[j] * widen(bt[j * stride + o]);
    y[o] += acc;
  }
}

template <typename T>
void add_lora(float* y, const float* x, const T* a, const T* bt, const float* scale, const int64_t* part_end,
              const int64_t* slot, int64_t rows, int64_t in, int64_t out, int64_t parts, int64_t R, int64_t r) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> u(parts * r);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t s = slot[i];
      if (s < 0) continue;
      int64_t next = -1;  // the slot of this thread's next row with an adapter
      for (int64_t k = i + 1; k < end && next < 0; ++k) next = slot[k] == s ? -1 : slot[k];
      const int64_t ahead_a = next < 0 ? 0 : (next - s) * parts * R * in, ahead_b = next < 0 ? 0 : (next - s) * R * out;
      const float* xi = x + i * in;
      for (int64_t p = 0; p < parts; ++p) {
        float* up = u.data() + p * r;
        dot_rows(a + (s * parts + p) * R * in, xi, in, r, up, ahead_a);
        for (int64_t j = 0; j < r; ++j) up[j] *= scale[s * parts + p];
      }
      const T* bts = bt + s * R * out;
      for (int64_t p = 0; p < parts; ++p)
        expand(y + i * out, u.data() + p * r, bts, out, r, p ? part_end[p - 1] : 0, part_end[p], ahead_b);
    }
  });
}

void add_lora_(torch::Tensor y, torch::Tensor x, torch::Tensor a, torch::Tensor bt, torch::Tensor scale,
               torch::Tensor part_end, torch::Tensor slot, int64_t r) {
  TORCH_CHECK(y.is_contiguous() && x.is_contiguous() && a.is_contiguous() && bt.is_contiguous() &&
              scale.is_contiguous() && part_end.is_contiguous() && slot.is_contiguous(), "contiguous tensors only");
  TORCH_CHECK(y.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat && scale.scalar_type() == at::kFloat,
              "y, x and scale must be fp32");
  TORCH_CHECK(a.scalar_type() == bt.scalar_type(), "A and B^T must share a dtype");
  TORCH_CHECK(slot.scalar_type() == at::kLong && part_end.scalar_type() == at::kLong, "slot and part_end are int64");
  const int64_t in = x.size(-1), out = y.size(-1), rows = in ? x.numel() / in : 0, parts = a.size(1), R = a.size(2);
  TORCH_CHECK(out && y.numel() / out == rows && slot.size(0) == rows && a.size(3) == in && bt.size(1) == R && bt.size(2) == out &&
              part_end.size(0) == parts && r >= 0 && r <= R, "shapes do not match");
  if (a.scalar_type() == at::kBFloat16) {
    add_lora(y.data_ptr<float>(), x.data_ptr<float>(), static_cast<const uint16_t*>(a.data_ptr()),
             static_cast<const uint16_t*>(bt.data_ptr()), scale.data_ptr<float>(), part_end.data_ptr<int64_t>(),
             slot.data_ptr<int64_t>(), rows, in, out, parts, R, r);
  } else {
    TORCH_CHECK(a.scalar_type() == at::kFloat, "A and B^T must be fp32 or bf16");
    add_lora(y.data_ptr<float>(), x.data_ptr<float>(), a.data_ptr<float>(), bt.data_ptr<float>(),
             scale.data_ptr<float>(), part_end.data_ptr<int64_t>(), slot.data_ptr<int64_t>(), rows, in, out, parts,
             R, r);
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("add_lora_", &add_lora_, "y += the LoRA update of each row's slot (in place)");
}
