// Decode attention over a paged KV cache on a CPU: each sequence's keys and values are read where they lie,
// in the blocks its block table names, never gathered into a contiguous copy.
//
// Shapes: q (n, heads, d) fp32, one query per sequence (the token being decoded); keys and values
// (blocks, kv_heads, block_size, d) fp32, one layer of the cache; table (n, max_blocks) int64, sequence
// i's position p lives at offset p % block_size of block table[i, p / block_size]; length (n,) int64, the
// positions sequence i attends to ([0, length_i), its new token's included); out (n, heads, d) fp32.
//
// For query head h of sequence i, with kv head g = h / (heads / kv_heads) (grouped-query attention):
//
//     s_j   = scale * <q_ih, k_ig,j>                          j < length_i
//     out_ih = sum_j softmax(s)_j v_ig,j
//
// Work is split over (sequence, kv head) pairs on PyTorch's thread pool. Each pair reads its keys once
// (scoring every query head of its group against each key) and its values once, and each sum runs in a
// fixed order, so a sequence's result does not depend on what it is batched with.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

inline float dot(const float* a, const float* b, int64_t d) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < d; ++k) sum += a[k] * b[k];
  return sum;
}

inline void axpy(float* y, float w, const float* x, int64_t d) {
#pragma omp simd
  for (int64_t k = 0; k < d; ++k) y[k] += w * x[k];
}

}  // namespace

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor keys, torch::Tensor values, torch::Tensor table,
                                     torch::Tensor length, double scale) {
  TORCH_CHECK(q.dim() == 3 && keys.dim() == 4 && values.sizes() == keys.sizes(),
              "q is (n, heads, d); keys and values are (blocks, kv_heads, block_size, d)");
  TORCH_CHECK(q.scalar_type() == at::kFloat && keys.scalar_type() == at::kFloat &&
                  values.scalar_type() == at::kFloat, "the paged attention kernel takes fp32");
  TORCH_CHECK(q.is_contiguous() && keys.is_contiguous() && values.is_contiguous() && table.is_contiguous() &&
                  length.is_contiguous(), "inputs must be contiguous");
  TORCH_CHECK(table.scalar_type() == at::kLong && length.scalar_type() == at::kLong, "table and length are int64");
  const int64_t n = q.size(0), heads = q.size(1), d = q.size(2);
  const int64_t num_blocks = keys.size(0), kv_heads = keys.size(1), block = keys.size(2);
  TORCH_CHECK(keys.size(3) == d && heads % kv_heads == 0 && table.dim() == 2 && table.size(0) == n &&
                  length.size(0) == n, "shapes do not match");
  const int64_t group = heads / kv_heads, max_blocks = table.size(1);
  const int64_t* lengths = length.data_ptr<int64_t>();
  const int64_t* tables = table.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(lengths[i] > 0 && lengths[i] <= max_blocks * block, "a sequence's length exceeds its block table");
    for (int64_t b = 0; b < (lengths[i] + block - 1) / block; ++b)
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
      const int64_t i = job / kv_heads, g = job % kv_heads, len = lengths[i];
      const int64_t* row = tables + i * max_blocks;
      const float* query = qs + (i * heads + g * group) * d;  // the group's query heads, consecutive
      scores.assign(group * len, 0.f);
      for (int64_t j = 0; j < len; ++j) {
        const float* key = ks + row[j / block] * block_stride + g * head_stride + (j % block) * d;
        for (int64_t h = 0; h < group; ++h) scores[h * len + j] = softmax_scale * dot(query + h * d, key, d);
      }
      for (int64_t h = 0; h < group; ++h) {  // softmax in place: exp(s - max) / sum
        float* s = scores.data() + h * len;
        const float top = *std::max_element(s, s + len);
        float total = 0.f;
        for (int64_t j = 0; j < len; ++j) total += (s[j] = std::exp(s[j] - top));
        const float inv = 1.f / total;
        for (int64_t j = 0; j < len; ++j) s[j] *= inv;
      }
      float* result = os + (i * heads + g * group) * d;
      for (int64_t j = 0; j < len; ++j) {
        const float* value = vs + row[j / block] * block_stride + g * head_stride + (j % block) * d;
        for (int64_t h = 0; h < group; ++h) axpy(result + h * d, scores[h * len + j], value, d);
      }
    }
  });
  return out;
}
