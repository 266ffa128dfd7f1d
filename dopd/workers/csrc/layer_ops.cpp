// A decoder layer's small ops, fused (float32, CPU): residual add + RMSNorm, rotary embedding in
// place, SiLU(gate) * up. On a decode step each works on a few rows, and as torch ops they were
// 5-8 kernel launches apiece, ~15 ms of a 16-sequence SmolLM2 step; here each is one call.
// Same formulas as transformers' Llama modules; only the order of a row's sum differs.
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "simd_exp.h"

namespace {

constexpr int kLanes = 16;

inline __mmask16 tail_mask(int n) { return (__mmask16)((1u << n) - 1); }

}  // namespace

extern "C" {

// residual = x + add (when add is not null; else residual = x), out = weight * rmsnorm(residual).
// x, add, residual, out: [rows, dim] contiguous; residual may alias x.
void dopd_add_rms_norm(const float* x, const float* add, const float* weight, int rows, int dim, float eps,
                       float* residual, float* out) {
#pragma omp parallel for schedule(static) if (rows >= 8)
  for (int m = 0; m < rows; ++m) {
    const float* xr = x + (int64_t)m * dim;
    const float* ar = add ? add + (int64_t)m * dim : nullptr;
    float* rr = residual + (int64_t)m * dim;
    __m512 squares = _mm512_setzero_ps();
    for (int i = 0; i < dim; i += kLanes) {
      const __mmask16 mask = dim - i >= kLanes ? 0xFFFF : tail_mask(dim - i);
      __m512 v = _mm512_maskz_loadu_ps(mask, xr + i);
      if (ar) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, ar + i));
      _mm512_mask_storeu_ps(rr + i, mask, v);
      squares = _mm512_fmadd_ps(v, v, squares);
    }
    const float inv = 1.0f / std::sqrt(_mm512_reduce_add_ps(squares) / dim + eps);
    const __m512 scale = _mm512_set1_ps(inv);
    float* orow = out + (int64_t)m * dim;
    for (int i = 0; i < dim; i += kLanes) {
      const __mmask16 mask = dim - i >= kLanes ? 0xFFFF : tail_mask(dim - i);
      const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, rr + i), scale);
      _mm512_mask_storeu_ps(orow + i, mask, _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, weight + i), v));
    }
  }
}

// In place on the first `heads` heads of each row: x = x * cos + rotate_half(x) * sin, where
// rotate_half(x) = (-x[half:], x[:half]). x: rows of `row_stride` floats; cos, sin: [rows, head_dim].
void dopd_rotary(float* x, int rows, int row_stride, int heads, int head_dim, const float* cos, const float* sin) {
  const int half = head_dim / 2;
#pragma omp parallel for schedule(static) if (rows >= 8)
  for (int m = 0; m < rows; ++m) {
    const float* c = cos + (int64_t)m * head_dim;
    const float* s = sin + (int64_t)m * head_dim;
    for (int h = 0; h < heads; ++h) {
      float* v = x + (int64_t)m * row_stride + h * head_dim;
      for (int i = 0; i < half; i += kLanes) {
        const __mmask16 mask = half - i >= kLanes ? 0xFFFF : tail_mask(half - i);
        const __m512 a = _mm512_maskz_loadu_ps(mask, v + i), b = _mm512_maskz_loadu_ps(mask, v + half + i);
        const __m512 lo = _mm512_sub_ps(_mm512_mul_ps(a, _mm512_maskz_loadu_ps(mask, c + i)),
                                        _mm512_mul_ps(b, _mm512_maskz_loadu_ps(mask, s + i)));
        const __m512 hi = _mm512_add_ps(_mm512_mul_ps(b, _mm512_maskz_loadu_ps(mask, c + half + i)),
                                        _mm512_mul_ps(a, _mm512_maskz_loadu_ps(mask, s + half + i)));
        _mm512_mask_storeu_ps(v + i, mask, lo);
        _mm512_mask_storeu_ps(v + half + i, mask, hi);
      }
    }
  }
}

// out[m] = silu(gate_up[m, :inter]) * gate_up[m, inter:]; silu(g) = g / (1 + exp(-g)).
void dopd_silu_mul(const float* gate_up, int rows, int inter, float* out) {
#pragma omp parallel for schedule(static) if (rows >= 8)
  for (int m = 0; m < rows; ++m) {
    const float* g = gate_up + (int64_t)m * 2 * inter;
    const float* u = g + inter;
    float* o = out + (int64_t)m * inter;
    for (int i = 0; i < inter; i += kLanes) {
      const __mmask16 mask = inter - i >= kLanes ? 0xFFFF : tail_mask(inter - i);
      const __m512 gv = _mm512_maskz_loadu_ps(mask, g + i);
      const __m512 silu = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
      _mm512_mask_storeu_ps(o + i, mask, _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(mask, u + i)));
    }
  }
}

}
