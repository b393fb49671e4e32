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
// (scoring every query and head of its group against each key: with several of them, against the block
// transposed, see `scores_tile`) and its values once, block by block, and
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

// The scores of R queries against a block of 16 keys held transposed (key_t[k * 16 + o] is key o's k-th
// value): for each query, 16 lanes, one per key, built up over d broadcast multiply-adds with no sum across
// lanes; the R queries' sums are independent, so the multiply-adds overlap instead of waiting on each
// other. Where many queries share a block this beats 16 `dot`s per query, whose lanes must each be summed
// at the end; the transpose is paid once per block for them all.
template <int R>
inline void scores_tile(const float* const* queries, const float* key_t, int64_t d, f32x16* acc) {
  for (int j = 0; j < R; ++j) acc[j] = f32x16{};
  for (int64_t k = 0; k < d; ++k) {
    f32x16 column;
    std::memcpy(&column, key_t + k * 16, sizeof column);
    for (int j = 0; j < R; ++j) acc[j] += queries[j][k] * column;
  }
}

inline void axpy(float* y, float w, const float* x, int64_t d) {
#pragma omp simd
  for (int64_t k = 0; k < d; ++k) y[k] += w * x[k];
}

// y_j += sum_o p_j[o] x[o] for R rows j at once, x[o] a row of D values: the R x D sums stay in registers
// over the whole block (a loop of axpys would store and reload y for every o), and each x[o] is loaded once
// for the R rows.
template <int D, int R>
inline void weighted_sum_tile(float* const* ys, const float* const* ps, const float* x, int64_t count) {
  constexpr int L = D / 16;
  f32x16 acc[R][L];
  for (int j = 0; j < R; ++j)
    for (int c = 0; c < L; ++c) std::memcpy(&acc[j][c], ys[j] + c * 16, sizeof(f32x16));
  for (int64_t o = 0; o < count; ++o) {
    for (int c = 0; c < L; ++c) {
      f32x16 v;
      std::memcpy(&v, x + o * D + c * 16, sizeof v);
      for (int j = 0; j < R; ++j) acc[j][c] += ps[j][o] * v;
    }
  }
  for (int j = 0; j < R; ++j)
    for (int c = 0; c < L; ++c) std::memcpy(ys[j] + c * 16, &acc[j][c], sizeof(f32x16));
}

// Rows of a tile: 4 while 4 x D/16 accumulators fit in the registers, else 2.
constexpr int tile_rows(int64_t d) { return d <= 64 ? 4 : 2; }

// `weighted_sum_tile` for `rows` rows (a tile's worth, or one); false if d has no fixed-size form.
inline bool weighted_sum(float* const* ys, const float* const* ps, const float* x, int64_t count, int64_t d,
                         int rows) {
  switch (d * 8 + rows) {
    case 32 * 8 + 4: weighted_sum_tile<32, 4>(ys, ps, x, count); return true;
    case 32 * 8 + 1: weighted_sum_tile<32, 1>(ys, ps, x, count); return true;
    case 64 * 8 + 4: weighted_sum_tile<64, 4>(ys, ps, x, count); return true;
    case 64 * 8 + 1: weighted_sum_tile<64, 1>(ys, ps, x, count); return true;
    case 128 * 8 + 2: weighted_sum_tile<128, 2>(ys, ps, x, count); return true;
    case 128 * 8 + 1: weighted_sum_tile<128, 1>(ys, ps, x, count); return true;
    default: return false;
  }
}

// From this many (query, head) rows per (sequence, kv head), scores go through the transposed block,
// SCORE_TILE rows at a time.
constexpr int64_t TRANSPOSE_MIN_ROWS = 4;
constexpr int SCORE_TILE = 4;


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

// max of s[0..len), 16 lanes at a time.
inline float largest(const float* s, int64_t len) {
  float top = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  if (len >= 16) {
    f32x16 tops;
    std::memcpy(&tops, s, sizeof tops);
    for (j = 16; j + 16 <= len; j += 16) {
      f32x16 v;
      std::memcpy(&v, s + j, sizeof v);
      tops = v > tops ? v : tops;
    }
    for (int k = 0; k < 16; ++k) top = std::max(top, tops[k]);
  }
  for (; j < len; ++j) top = std::max(top, s[j]);
  return top;
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
    std::vector<float> scores, key_t(d * 16);
    for (int64_t job = begin; job < end; ++job) {
      const int64_t i = job / kv_heads, g = job % kv_heads;
      const int64_t* row = tables + i * max_blocks;
      const int64_t* seen = positions + i * T;  // query t sees keys [0, seen[t]]
      int64_t longest = 0;
      for (int64_t t = 0; t < T; ++t) longest = std::max(longest, seen[t] + 1);
      const int64_t rows = T * group;  // (query, head of the group) pairs, each a row of `scores`
      scores.assign(rows * longest, 0.f);
      const bool transposed = block == 16 && rows >= TRANSPOSE_MIN_ROWS;
      auto query_of = [&](int64_t r) { return qs + ((i * T + r / group) * heads + g * group + r % group) * d; };
      auto visible_of = [&](int64_t r, int64_t start, int64_t count) {
        return std::min(count, seen[r / group] + 1 - start);
      };
      for (int64_t start = 0; start < longest; start += block) {  // keys, block by block
        const float* key_block = ks + row[start / block] * block_stride + g * head_stride;
        const int64_t count = std::min(block, longest - start);
        if (!transposed) {
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t visible = visible_of(r, start, count);
            const float* query = query_of(r);
            float* s = scores.data() + r * longest + start;
            for (int64_t o = 0; o < visible; ++o) s[o] = softmax_scale * dot(query, key_block + o * d, d);
          }
          continue;
        }
        for (int64_t k = 0; k < d; ++k)  // key_t[k][o] = key o's k-th value
          for (int64_t o = 0; o < 16; ++o) key_t[k * 16 + o] = o < count ? key_block[o * d + k] : 0.f;
        for (int64_t r0 = 0; r0 < rows; r0 += SCORE_TILE) {  // a short last tile repeats its last row, unstored
          const float* queries[SCORE_TILE];
          for (int j = 0; j < SCORE_TILE; ++j) queries[j] = query_of(std::min<int64_t>(r0 + j, rows - 1));
          f32x16 lanes[SCORE_TILE];
          scores_tile<SCORE_TILE>(queries, key_t.data(), d, lanes);
          for (int64_t j = 0; j < SCORE_TILE && r0 + j < rows; ++j) {
            const int64_t visible = visible_of(r0 + j, start, count);
            if (visible <= 0) continue;
            lanes[j] *= softmax_scale;
            std::memcpy(scores.data() + (r0 + j) * longest + start, &lanes[j], visible * sizeof(float));
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) {  // softmax over each row's visible keys, in place
        const int64_t len = seen[r / group] + 1;
        float* s = scores.data() + r * longest;
        const float inv = 1.f / exp_shifted(s, len, largest(s, len));
        for (int64_t j = 0; j < len; ++j) s[j] *= inv;
      }
      // Values, block by block. A row's probabilities past its visible keys are 0 (never written), so every
      // row of a tile can run over the block's `count` keys.
      const int values_tile = rows >= tile_rows(d) ? static_cast<int>(tile_rows(d)) : 1;
      for (int64_t start = 0; start < longest; start += block) {
        const float* value_block = vs + row[start / block] * block_stride + g * head_stride;
        const int64_t count = std::min(block, longest - start);
        for (int64_t r0 = 0; r0 < rows; r0 += values_tile) {
          float* results[4];
          const float* probabilities[4];
          const int64_t in_tile = std::min<int64_t>(values_tile, rows - r0);
          for (int j = 0; j < values_tile; ++j) {  // a short last tile runs its rows one at a time
            const int64_t r = r0 + std::min<int64_t>(j, in_tile - 1);
            results[j] = os + (query_of(r) - qs);
            probabilities[j] = scores.data() + r * longest + start;
          }
          if (in_tile == values_tile && weighted_sum(results, probabilities, value_block, count, d, values_tile))
            continue;
          for (int64_t j = 0; j < in_tile; ++j) {
            float* result = results[j];
            const float* p = probabilities[j];
            if (!weighted_sum(&result, &p, value_block, count, d, 1))
              for (int64_t o = 0; o < count; ++o) axpy(result, p[o], value_block + o * d, d);
          }
        }
      }
    }
  });
  return out;
}
