// y[M,N] = x[M,K] @ W[N,K]^T for W kept in GGUF's 32-weight block formats, Q4_1 and Q8_0.
//
// Each weight is dequantised exactly as gguf-py does (Q4_1: d*q + m, Q8_0: d*q, in float32; d*q
// is exact, so a fused multiply-add rounds as numpy's two ops do): the matrix is the float32 one
// transformers loads, read at 0.75 (Q4_1) or 1.125 (Q8_0) bytes a weight instead of 4.
//
// Layout (made by dopd/workers/gguf.py): rows in panels of 16, and within a panel the codes of the
// 16 rows for one k side by side, so one vector holds one k of 16 outputs and a tile accumulates
// x[m,k] * w[k, 16 rows] with no horizontal sums. Q4_1 packs k (low nibble) and k+1 (high nibble)
// of a row in one byte. Scales (and Q4_1's minimums) are float32, [panel, K/32, 16].
//
// AVX-512 (the Python side builds this only where the CPU has it); threads from OpenMP, which
// resolves to the libgomp torch has loaded, so it shares torch's thread team.
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int kBlock = 32;  // weights per GGUF block, along K
constexpr int kPanel = 16;  // output rows per panel: one float vector
constexpr int kMTile = 16;  // rows of x per tile: 16 accumulators, the dequantised k pair, x

typedef __m512 f32x16;  // GCC lets +, * work on it lane by lane

inline f32x16 load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, f32x16 v) { _mm512_storeu_ps(p, v); }
inline __m128i load_bytes(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }

// The two weight vectors (k and k+1, 16 rows each) of a panel at an even k.
struct Q4_1 {
  const uint8_t* codes;  // [panels, K/2, 16]
  const float* scale;    // [panels, K/32, 16]
  const float* min;
  int K;
  inline void pair(int panel, int k, f32x16& w0, f32x16& w1) const {
    const __m512i q = _mm512_cvtepu8_epi32(load_bytes(codes + ((int64_t)panel * K + k) * 8));
    const int64_t g = ((int64_t)panel * (K / kBlock) + k / kBlock) * kPanel;
    const f32x16 d = load(scale + g), m = load(min + g);
    w0 = _mm512_cvtepi32_ps(_mm512_and_si512(q, _mm512_set1_epi32(0x0F))) * d + m;
    w1 = _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)) * d + m;
  }
};

struct Q8_0 {
  const int8_t* codes;  // [panels, K, 16]
  const float* scale;   // [panels, K/32, 16]
  int K;
  inline void pair(int panel, int k, f32x16& w0, f32x16& w1) const {
    const int8_t* c = codes + ((int64_t)panel * K + k) * kPanel;
    const f32x16 d = load(scale + ((int64_t)panel * (K / kBlock) + k / kBlock) * kPanel);
    w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(load_bytes(c))) * d;
    w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(load_bytes(c + kPanel))) * d;
  }
};

// y[0..MR, panel's 16 columns] from one m-tile of x, transposed: xt[k][16], rows past M zero, so
// that each k's broadcasts come from one cache line. Below 8 rows even and odd k accumulate apart,
// two chains per row, or the FMA latency would bound it.
template <int MR, typename W>
inline void tile(const float* xt, int K, const W& w, int panel, float* y, int N) {
  constexpr bool split = MR < 8;
  f32x16 even[MR] = {}, odd[MR] = {};
  for (int k = 0; k < K; k += 2) {
    f32x16 w0, w1;
    w.pair(panel, k, w0, w1);
    const float* x0 = xt + (int64_t)k * kMTile;
    for (int i = 0; i < MR; ++i) even[i] += x0[i] * w0;
    for (int i = 0; i < MR; ++i) (split ? odd[i] : even[i]) += x0[kMTile + i] * w1;
  }
  for (int i = 0; i < MR; ++i) store(y + i * N + panel * kPanel, split ? even[i] + odd[i] : even[i]);
}

template <typename W>
void matmul(const float* x, int M, int K, int N, float* y, const W& w) {
  const int panels = N / kPanel, mtiles = (M + kMTile - 1) / kMTile, kchunks = K / kBlock;
  // Reused, not allocated per call: a decode step makes 121 of these calls.
  static thread_local std::vector<float> xt;
  xt.resize((size_t)mtiles * K * kMTile);
  float* const xtp = xt.data();
#pragma omp parallel
  {
    // The transpose is split over the threads too (done by the caller alone, a step's 30
    // down_proj calls at 16 rows took 5.9 ms instead of 4.6).
#pragma omp for schedule(static)
    for (int c = 0; c < mtiles * kchunks; ++c) {
      const int t = c / kchunks, k0 = (c % kchunks) * kBlock, rows = M - t * kMTile < kMTile ? M - t * kMTile : kMTile;
      float* dst = xtp + ((size_t)t * K + k0) * kMTile;
      const float* src = x + (int64_t)t * kMTile * K + k0;
      for (int k = 0; k < kBlock; ++k)
        for (int r = 0; r < kMTile; ++r) dst[k * kMTile + r] = r < rows ? src[(int64_t)r * K + k] : 0.0f;
    }
#pragma omp for schedule(static)
    for (int p = 0; p < panels; ++p) {
      for (int t = 0; t < mtiles; ++t) {
        const float* xr = xtp + (size_t)t * K * kMTile;
        float* yr = y + (int64_t)t * kMTile * N;
        switch (M - t * kMTile < kMTile ? M - t * kMTile : kMTile) {
#define DOPD_TILE(R) case R: tile<R>(xr, K, w, p, yr, N); break;
          DOPD_TILE(1) DOPD_TILE(2) DOPD_TILE(3) DOPD_TILE(4) DOPD_TILE(5) DOPD_TILE(6) DOPD_TILE(7) DOPD_TILE(8)
          DOPD_TILE(9) DOPD_TILE(10) DOPD_TILE(11) DOPD_TILE(12) DOPD_TILE(13) DOPD_TILE(14) DOPD_TILE(15) DOPD_TILE(16)
#undef DOPD_TILE
        }
      }
    }
  }
}

}  // namespace

extern "C" {

// Shapes: K a multiple of 32, N of 16; x and y row-major float32.
void dopd_q4_1_matmul(const float* x, int M, int K, int N, const uint8_t* codes, const float* scale,
                      const float* min, float* y) {
  matmul(x, M, K, N, y, Q4_1{codes, scale, min, K});
}

void dopd_q8_0_matmul(const float* x, int M, int K, int N, const int8_t* codes, const float* scale, float* y) {
  matmul(x, M, K, N, y, Q8_0{codes, scale, K});
}

}
