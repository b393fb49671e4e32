// Attention of a few queries per sequence over a paged KV cache on a CPU (decode: one; an aLoRA's invocation
// or a chat's new turn after a cached history: a handful): each sequence's keys and values are read where
// they lie, in the blocks its block table names, never gathered into a contiguous copy.
//
// Shapes: q (n, T, heads, d) fp32, T queries per sequence; position (n, T) int64, where each query sits;
// keys and values (blocks, kv_heads, block_size, d) fp32, one layer of the cache; table (n, max_blocks)
// int64, sequence i's position p lives at offset p % block_size of block table[i, p / block_size];
// out (n, T, heads, d) fp32.
//
// For query t of sequence i at position p, query head h, kv head g = h / (heads / kv_heads) (grouped-query
// attention), the keys it sees are those at positions j <= p:
//
//     s_j     = scale * <q_ith, k_ig,j>                       j <= p
//     out_ith = sum_j softmax(s)_j v_ig,j
//
// Work is split over (sequence, kv head) pairs on PyTorch's thread pool. Each pair reads its keys once
// (scoring every query and head of its group against each key) and its values once, block by block, and
// each sum runs in a fixed order, so a sequence's result does not depend on what it is batched with.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// 16, 8 and 4 lanes of fp32 as GCC/Clang vectors (one AVX-512 register, two AVX2 ones, ...).
typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

// <a, b> over d values, 16 lanes at a time and summed as a tree (a plain loop is one chain of dependent
// adds: the score of a key would cost its latency, d adds in a row).
inline float dot(const float* a, const float* b, int64_t d) {
  f32x16 acc = {};
  int64_t k = 0;
  for (; k + 16 <= d; k += 16) {
    f32x16 x, y;
    std::memcpy(&x, a + k, sizeof x);
    std::memcpy(&y, b + k, sizeof y);
    acc += x * y;
  }
  f32x8 lo, hi;
  std::memcpy(&lo, &acc, sizeof lo);
  std::memcpy(&hi, reinterpret_cast<const char*>(&acc) + sizeof lo, sizeof hi);
  const f32x8 eight = lo + hi;
  f32x4 four_lo, four_hi;
  std::memcpy(&four_lo, &eight, sizeof four_lo);
  std::memcpy(&four_hi, reinterpret_cast<const char*>(&eight) + sizeof four_lo, sizeof four_hi);
  const f32x4 four = four_lo + four_hi;
  float sum = (four[0] + four[2]) + (four[1] + four[3]);
  for (; k < d; ++k) sum += a[k] * b[k];
  return sum;
}

inline void axpy(float* y, float w, const float* x, int64_t d) {
#pragma omp simd
  for (int64_t k = 0; k < d; ++k) y[k] += w * x[k];
}

// exp of 16 lanes at once (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial for e^r, 2^n
// from the exponent bits), within 2 ulp of std::exp for x in [-87, 88]; the softmax's exps, which scalar
// std::exp would make the kernel's largest cost.
inline f32x16 exp16(f32x16 x) {
  const f32x16 zero = {};
  x = x < zero - 87.0f ? zero - 87.0f : x;
  x = x > zero + 88.0f ? zero + 88.0f : x;
  const f32x16 n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const f32x16 r = x - n * 0.693359375f + n * 2.12194440e-4f;
  f32x16 p = zero + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const i32x16 bits = (__builtin_convertvector(n, i32x16) + 127) << 23;
  f32x16 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// s[j] = exp(s[j] - top) for j < len; returns their sum.
inline float exp_shifted(float* s, int64_t len, float top) {
  f32x16 sums = {};
  int64_t j = 0;
  for (; j + 16 <= len; j += 16) {
    f32x16 v;
    std::memcpy(&v, s + j, sizeof v);
    v = exp16(v - top);
    std::memcpy(s + j, &v, sizeof v);
    sums += v;
  }
  float total = 0.f;
  for (int k = 0; k < 16; ++k) total += sums[k];
  for (; j < len; ++j) total += (s[j] = std::exp(s[j] - top));
  return total;
}

}  // namespace

torch::Tensor paged_attention(torch::Tensor q, torch::Tensor position, torch::Tensor keys, torch::Tensor values,
                              torch::Tensor table, double scale) {
  TORCH_CHECK(q.dim() == 4 && keys.dim() == 4 && values.sizes() == keys.sizes() && position.dim() == 2,
              "q is (n, T, heads, d), position (n, T); keys and values are (blocks, kv_heads, block_size, d)");
  TORCH_CHECK(q.scalar_type() == at::kFloat && keys.scalar_type() == at::kFloat &&
                  values.scalar_type() == at::kFloat, "the paged attention kernel takes fp32");
  TORCH_CHECK(q.is_contiguous() && keys.is_contiguous() && values.is_contiguous() && table.is_contiguous() &&
                  position.is_contiguous(), "inputs must be contiguous");
  TORCH_CHECK(table.scalar_type() == at::kLong && position.scalar_type() == at::kLong, "table and position are int64");
  const int64_t n = q.size(0), T = q.size(1), heads = q.size(2), d = q.size(3);
  const int64_t num_blocks = keys.size(0), kv_heads = keys.size(1), block = keys.size(2);
  TORCH_CHECK(keys.size(3) == d && heads % kv_heads == 0 && table.dim() == 2 && table.size(0) == n &&
                  position.size(0) == n && position.size(1) == T, "shapes do not match");
  const int64_t group = heads / kv_heads, max_blocks = table.size(1);
  const int64_t* positions = position.data_ptr<int64_t>();
  const int64_t* tables = table.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    int64_t longest = 0;
    for (int64_t t = 0; t < T; ++t) {
      TORCH_CHECK(positions[i * T + t] >= 0, "positions are >= 0");
      longest = std::max(longest, positions[i * T + t] + 1);
    }
    TORCH_CHECK(longest <= max_blocks * block, "a sequence's positions exceed its block table");
    for (int64_t b = 0; b < (longest + block - 1) / block; ++b)
      TORCH_CHECK(tables[i * max_blocks + b] >= 0 && tables[i * max_blocks + b] < num_blocks, "block out of range");
  }
  auto out = torch::zeros_like(q);
  const float* qs = q.data_ptr<float>();
  const float* ks = keys.data_ptr<float>();
  const float* vs = values.data_ptr<float>();
  float* os = out.data_ptr<float>();
  const int64_t block_stride = kv_heads * block * d, head_stride = block * d;
  const float softmax_scale = static_cast<float>(scale);

  at::parallel_for(0, n * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t job = begin; job < end; ++job) {
      const int64_t i = job / kv_heads, g = job % kv_heads;
      const int64_t* row = tables + i * max_blocks;
      const int64_t* seen = positions + i * T;  // query t sees keys [0, seen[t]]
      int64_t longest = 0;
      for (int64_t t = 0; t < T; ++t) longest = std::max(longest, seen[t] + 1);
      const int64_t rows = T * group;  // (query, head of the group) pairs, each a row of `scores`
      scores.assign(rows * longest, 0.f);
      for (int64_t start = 0; start < longest; start += block) {  // keys, block by block
        const float* key_block = ks + row[start / block] * block_stride + g * head_stride;
        const int64_t count = std::min(block, longest - start);
        for (int64_t t = 0; t < T; ++t) {
          const int64_t visible = std::min(count, seen[t] + 1 - start);
          const float* query = qs + ((i * T + t) * heads + g * group) * d;
          for (int64_t h = 0; h < group; ++h) {
            float* s = scores.data() + (t * group + h) * longest + start;
            for (int64_t o = 0; o < visible; ++o) s[o] = softmax_scale * dot(query + h * d, key_block + o * d, d);
          }
        }
      }
      for (int64_t t = 0; t < T; ++t) {  // softmax over each row's visible keys, in place
        const int64_t len = seen[t] + 1;
        for (int64_t h = 0; h < group; ++h) {
          float* s = scores.data() + (t * group + h) * longest;
          const float inv = 1.f / exp_shifted(s, len, *std::max_element(s, s + len));
          for (int64_t j = 0; j < len; ++j) s[j] *= inv;
        }
      }
      for (int64_t start = 0; start < longest; start += block) {  // values, block by block
        const float* value_block = vs + row[start / block] * block_stride + g * head_stride;
        const int64_t count = std::min(block, longest - start);
        for (int64_t t = 0; t < T; ++t) {
          const int64_t visible = std::min(count, seen[t] + 1 - start);
          float* result = os + ((i * T + t) * heads + g * group) * d;
          for (int64_t h = 0; h < group; ++h) {
            const float* p = scores.data() + (t * group + h) * longest + start;
            for (int64_t o = 0; o < visible; ++o) axpy(result + h * d, p[o], value_block + o * d, d);
          }
        }
      }
    }
  });
  return out;
}
