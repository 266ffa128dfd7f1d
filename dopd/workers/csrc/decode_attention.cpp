// Decode attention straight over the paged KV pool (float32, CPU): one query token a sequence.
//
// The pool is block-major, [num_blocks, num_layers, 2 (k, v), block_size, kv_heads, head_dim]
// (dopd/kv/pool.py); each sequence's keys and values are read through its block table in place, so
// nothing is gathered. For each (sequence, KV head) its group of query heads is scored against
// every key, softmaxed, and the values summed, two passes over the context.
#include <immintrin.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "simd_exp.h"

namespace {

constexpr int kLanes = 16;

inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// One (sequence, KV head) task: G query heads of VECS x 16 floats, in registers throughout.
template <int G, int VECS>
void attend(const float* q, const float* pool, int64_t layer_offset, int block_size, int64_t token_stride,
            int64_t kv_stride, int64_t block_stride, const int32_t* table, int len, float scale, float* out,
            std::vector<float>& scores) {
  __m512 qv[G][VECS];
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < VECS; ++i) qv[g][i] = _mm512_mul_ps(_mm512_loadu_ps(q + (g * VECS + i) * kLanes), _mm512_set1_ps(scale));
  scores.resize((size_t)G * len);
  float* sc = scores.data();
  // Pass 1: scores (scale folded into q), and each query head's maximum.
  float maxima[G];
  for (int g = 0; g < G; ++g) maxima[g] = -INFINITY;
  for (int b = 0, t = 0; t < len; ++b) {
    const float* k = pool + table[b] * block_stride + layer_offset;
    for (int o = 0; o < block_size && t < len; ++o, ++t, k += token_stride) {
      for (int g = 0; g < G; ++g) {
        __m512 acc = _mm512_mul_ps(qv[g][0], _mm512_loadu_ps(k));
        for (int i = 1; i < VECS; ++i) acc = _mm512_fmadd_ps(qv[g][i], _mm512_loadu_ps(k + i * kLanes), acc);
        const float score = hsum(acc);
        sc[g * len + t] = score;
        maxima[g] = score > maxima[g] ? score : maxima[g];
      }
    }
  }
  // Softmax numerators, and their sums.
  float sums[G];
  for (int g = 0; g < G; ++g) {
    float* row = sc + g * len;
    __m512 total = _mm512_setzero_ps();
    const __m512 top = _mm512_set1_ps(maxima[g]);
    int t = 0;
    for (; t + kLanes <= len; t += kLanes) {
      const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(row + t), top));
      _mm512_storeu_ps(row + t, e);
      total = _mm512_add_ps(total, e);
    }
    if (t < len) {
      const __mmask16 tail = (__mmask16)((1u << (len - t)) - 1);
      const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, row + t), top));
      _mm512_mask_storeu_ps(row + t, tail, e);
      total = _mm512_add_ps(total, _mm512_maskz_mov_ps(tail, e));
    }
    sums[g] = hsum(total);
  }
  // Pass 2: the values, weighted.
  __m512 acc[G][VECS];
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < VECS; ++i) acc[g][i] = _mm512_setzero_ps();
  for (int b = 0, t = 0; t < len; ++b) {
    const float* v = pool + table[b] * block_stride + layer_offset + kv_stride;
    for (int o = 0; o < block_size && t < len; ++o, ++t, v += token_stride) {
      __m512 vv[VECS];
      for (int i = 0; i < VECS; ++i) vv[i] = _mm512_loadu_ps(v + i * kLanes);
      for (int g = 0; g < G; ++g) {
        const __m512 p = _mm512_set1_ps(sc[g * len + t]);
        for (int i = 0; i < VECS; ++i) acc[g][i] = _mm512_fmadd_ps(p, vv[i], acc[g][i]);
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    const __m512 inv = _mm512_set1_ps(1.0f / sums[g]);
    for (int i = 0; i < VECS; ++i) _mm512_storeu_ps(out + (g * VECS + i) * kLanes, _mm512_mul_ps(acc[g][i], inv));
  }
}

using AttendFn = void (*)(const float*, const float*, int64_t, int, int64_t, int64_t, int64_t, const int32_t*, int,
                          float, float*, std::vector<float>&);

template <int G>
AttendFn pick_dim(int head_dim) {
  switch (head_dim) {
    case 16: return attend<G, 1>;
    case 32: return attend<G, 2>;
    case 64: return attend<G, 4>;
    case 128: return attend<G, 8>;
    default: return nullptr;
  }
}

// Instantiated for the query-group sizes and head sizes of the Llama family's checkpoints.
AttendFn pick(int group, int head_dim) {
  switch (group) {
    case 1: return pick_dim<1>(head_dim);
    case 2: return pick_dim<2>(head_dim);
    case 3: return pick_dim<3>(head_dim);
    case 4: return pick_dim<4>(head_dim);
    case 5: return pick_dim<5>(head_dim);
    case 6: return pick_dim<6>(head_dim);
    case 7: return pick_dim<7>(head_dim);
    case 8: return pick_dim<8>(head_dim);
    default: return nullptr;
  }
}

}  // namespace

extern "C" {

// Whether a (query heads per KV head, head size) shape has a kernel.
int dopd_paged_decode_attention_supports(int group, int head_dim) { return pick(group, head_dim) != nullptr; }

// q, out: [num_seqs, kv_heads * group, head_dim]; block_tables: [num_seqs, table_width] int32;
// kv_lens: [num_seqs] int32 (this step's token included, its key and value already in the pool).
// Returns 0, or -1 for a shape without a kernel.
int dopd_paged_decode_attention(const float* q, const float* pool, int num_layers, int layer, int block_size,
                                int kv_heads, int group, int head_dim, const int32_t* block_tables,
                                int table_width, const int32_t* kv_lens, int num_seqs, float scale, float* out) {
  const AttendFn fn = pick(group, head_dim);
  if (fn == nullptr) return -1;
  const int64_t token_stride = (int64_t)kv_heads * head_dim;  // one slot of one layer's keys
  const int64_t kv_stride = block_size * token_stride;        // keys -> values of a block
  const int64_t block_stride = (int64_t)num_layers * 2 * kv_stride;
  const int64_t heads_stride = (int64_t)kv_heads * group * head_dim;
  // A task per sequence: its KV heads one after another on one core, which then reads the
  // sequence's blocks while they are in its cache. A task per (sequence, head), the two cores
  // working through the same blocks, measured ~25% slower at 16 sequences (176 vs 133 us a layer
  // at 100 tokens each). Split by head only where there are too few sequences for the threads.
  const int heads_per_task = num_seqs >= 2 * omp_get_max_threads() ? kv_heads : 1;
  const int tasks_per_seq = kv_heads / heads_per_task;
#pragma omp parallel
  {
    std::vector<float> scores;
#pragma omp for schedule(dynamic, 1)
    for (int task = 0; task < num_seqs * tasks_per_seq; ++task) {
      const int s = task / tasks_per_seq, first = (task % tasks_per_seq) * heads_per_task;
      for (int h = first; h < first + heads_per_task; ++h) {
        const int64_t head = s * heads_stride + (int64_t)h * group * head_dim;
        fn(q + head, pool, layer * 2 * kv_stride + (int64_t)h * head_dim, block_size, token_stride, kv_stride,
           block_stride, block_tables + (int64_t)s * table_width, kv_lens[s], scale, out + head, scores);
      }
    }
  }
  return 0;
}

}
