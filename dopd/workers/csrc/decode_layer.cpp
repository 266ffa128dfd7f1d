// One decoder layer of a decode step in one call (float32, CPU, every projection in GGUF blocks).
//
// The same kernels, in the same order, as the layer's Python modules call one by one
// (dopd/workers/model.py: DecoderLayer with the kernels of cpu_kernels.py, TorchAttention's
// in-place decode), so the result is the same to the bit. What goes is the glue between them
// (views, copies, allocations, index_copy_ into the pool, ctypes calls): ~9 ms of a 16-sequence
// SmolLM2 step (~47 -> ~38 ms), ~7 ms of a 1-sequence one (~18 -> ~11 ms). The caller checked the
// shapes (dopd/workers/fused_decode.py).
#include <immintrin.h>

#include <cstdint>
#include <cstring>

extern "C" {
void dopd_q4_1_matmul(const float* x, int M, int K, int N, const uint8_t* codes, const float* scale,
                      const float* min, float* y);
void dopd_q8_0_matmul(const float* x, int M, int K, int N, const int8_t* codes, const float* scale, float* y);
void dopd_add_rms_norm(const float* x, const float* add, const float* weight, int rows, int dim, float eps,
                       float* residual, float* out);
void dopd_rotary(float* x, int rows, int row_stride, int heads, int head_dim, const float* cos, const float* sin);
void dopd_silu_mul(const float* gate_up, int rows, int inter, float* out);
int dopd_paged_decode_attention(const float* q, const float* pool, int num_layers, int layer, int block_size,
                                int kv_heads, int group, int head_dim, const int32_t* block_tables,
                                int table_width, const int32_t* kv_lens, int num_seqs, float scale, float* out);

// A projection's packed blocks (gguf.PackedWeight): kind 0 is Q4_1, 1 is Q8_0.
struct DopdProjection {
  const void* codes;
  const float* scale;
  const float* min;
  int32_t rows, cols, kind;
};

struct DopdDecodeLayer {
  DopdProjection qkv, o, gate_up, down;
  const float* input_norm;
  const float* post_norm;
  float eps;
  int32_t hidden, intermediate, num_heads, num_kv_heads, head_dim;
};

// What the step shares across layers: its rotary rows, the pool and the decode block tables
// (TorchAttention.prepare), and scratch for `dopd_decode_scratch_floats(layer, rows)` floats.
struct DopdDecodeStep {
  int32_t rows;
  const float* cos;  // [rows, head_dim]
  const float* sin;
  float* pool;  // [num_blocks, num_layers, 2, block_size, kv_heads, head_dim]
  int32_t num_layers, block_size;
  const int32_t* block_tables;  // [rows, table_width]
  int32_t table_width;
  const int32_t* kv_lens;    // [rows], this step's token included
  const int64_t* write_rows;  // [rows] pool row (kv_heads * head_dim floats) of each new key, layer 0
  float scale;
  float* scratch;
};
}

namespace {

void project(const DopdProjection& w, const float* x, int rows, float* y) {
  if (w.kind == 0)
    dopd_q4_1_matmul(x, rows, w.cols, w.rows, static_cast<const uint8_t*>(w.codes), w.scale, w.min, y);
  else
    dopd_q8_0_matmul(x, rows, w.cols, w.rows, static_cast<const int8_t*>(w.codes), w.scale, y);
}

}  // namespace

extern "C" {

int64_t dopd_decode_scratch_floats(const DopdDecodeLayer* w, int rows) {
  const int64_t q = (int64_t)w->num_heads * w->head_dim;
  return rows * (w->hidden + w->qkv.rows + 2 * q + w->hidden + 3 * (int64_t)w->intermediate + w->hidden);
}

// x [rows, hidden], the residual stream, is updated in place. Returns the attention kernel's status.
int dopd_decode_layer(const DopdDecodeLayer* w, const DopdDecodeStep* s, int layer, float* x) {
  const int rows = s->rows, hidden = w->hidden, qkv_width = w->qkv.rows;
  const int q_size = w->num_heads * w->head_dim, kv_size = w->num_kv_heads * w->head_dim;
  float* h = s->scratch;
  float* qkv = h + (int64_t)rows * hidden;
  float* q = qkv + (int64_t)rows * qkv_width;
  float* attn = q + (int64_t)rows * q_size;
  float* o = attn + (int64_t)rows * q_size;
  float* gate_up = o + (int64_t)rows * hidden;
  float* act = gate_up + (int64_t)rows * 2 * w->intermediate;
  float* mlp = act + (int64_t)rows * w->intermediate;

  dopd_add_rms_norm(x, nullptr, w->input_norm, rows, hidden, w->eps, x, h);
  project(w->qkv, h, rows, qkv);
  dopd_rotary(qkv, rows, qkv_width, w->num_heads + w->num_kv_heads, w->head_dim, s->cos, s->sin);
  const int64_t layer_rows = 2 * (int64_t)layer * s->block_size;  // layer 0's key row -> this layer's
  for (int i = 0; i < rows; ++i) {
    const float* row = qkv + (int64_t)i * qkv_width;
    float* key = s->pool + (s->write_rows[i] + layer_rows) * kv_size;
    std::memcpy(key, row + q_size, sizeof(float) * kv_size);
    std::memcpy(key + (int64_t)s->block_size * kv_size, row + q_size + kv_size, sizeof(float) * kv_size);
    std::memcpy(q + (int64_t)i * q_size, row, sizeof(float) * q_size);
  }
  const int status = dopd_paged_decode_attention(
      q, s->pool, s->num_layers, layer, s->block_size, w->num_kv_heads, w->num_heads / w->num_kv_heads, w->head_dim,
      s->block_tables, s->table_width, s->kv_lens, rows, s->scale, attn);
  if (status != 0) return status;
  project(w->o, attn, rows, o);
  dopd_add_rms_norm(x, o, w->post_norm, rows, hidden, w->eps, x, h);
  project(w->gate_up, h, rows, gate_up);
  dopd_silu_mul(gate_up, rows, w->intermediate, act);
  project(w->down, act, rows, mlp);
  const int64_t n = (int64_t)rows * hidden;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, _mm512_add_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(mlp + i)));
  for (; i < n; ++i) x[i] += mlp[i];
  return 0;
}
}
