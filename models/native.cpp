// tokenferry's own CPU kernels, built once per machine by models/native.py and registered as torch.ops.tokenferry.*.
//
// panel_linear: y = x W^T in float32 over a weight packed into panels of V output columns, [N/V, K, V], so
// that a tile of rows streams each panel once, in order. At one row a decode step is a pass over the weights,
// and oneDNN reads them at two thirds of what the machine streams; this reads them at its full rate.
//
// Batch invariance by construction: every output element is one chain of fused multiply-adds over k = 0..K-1,
// started from zero, whatever tile (rows x panels) computes it. A row's outputs are therefore the same bits in
// a call of 1 row or 70, and the same on every CPU with the same vector width.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace {

#if defined(__AVX512F__)
constexpr int64_t V = 16;  // floats per vector
using Vec = __m512;
inline Vec zero() { return _mm512_setzero_ps(); }
inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec splat(float x) { return _mm512_set1_ps(x); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
// A tile of 8 rows x 3 panels holds 24 accumulators, 3 weight vectors and a broadcast in the 32 registers.
constexpr int ROWS = 8, PANELS = 3;
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int64_t V = 8;
using Vec = __m256;
inline Vec zero() { return _mm256_setzero_ps(); }
inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
inline Vec splat(float x) { return _mm256_set1_ps(x); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
// 12 accumulators, 3 weight vectors and a broadcast: the 16 registers.
constexpr int ROWS = 4, PANELS = 3;
#else
#error "models/native.cpp needs AVX2 and FMA, or AVX-512"
#endif

// out[r][p*V + j] = sum over k of x[r][k] * panels[p][k][j], for R rows and P panels.
template <int R, int P>
void tile(const float* x, int64_t K, const float* panels, float* out, int64_t out_stride) {
  Vec acc[R][P];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) acc[r][p] = zero();
  const int64_t panel_stride = K * V;
  for (int64_t k = 0; k < K; ++k) {
    Vec w[P];
    for (int p = 0; p < P; ++p) w[p] = load(panels + p * panel_stride + k * V);
    for (int r = 0; r < R; ++r) {
      const Vec xr = splat(x[r * K + k]);
      for (int p = 0; p < P; ++p) acc[r][p] = fma(xr, w[p], acc[r][p]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) store(out + r * out_stride + p * V, acc[r][p]);
}

template <int R>
void tile_rows(int64_t panel_count, const float* x, int64_t K, const float* panels, float* out, int64_t out_stride) {
  static_assert(PANELS == 3, "the cases below cover 1..PANELS panels");
  if (panel_count == 3) tile<R, 3>(x, K, panels, out, out_stride);
  else if (panel_count == 2) tile<R, 2>(x, K, panels, out, out_stride);
  else tile<R, 1>(x, K, panels, out, out_stride);
}

template <int R = ROWS>
void tile_any(int64_t rows, int64_t panel_count, const float* x, int64_t K, const float* panels, float* out,
              int64_t out_stride) {
  if constexpr (R > 1) {
    if (rows < R) return tile_any<R - 1>(rows, panel_count, x, K, panels, out, out_stride);
  }
  tile_rows<R>(panel_count, x, K, panels, out, out_stride);
}

at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& panels) {
  // x [..., K] float32; panels [N/V, K, V] float32 contiguous -> [..., N]
  TORCH_CHECK(x.scalar_type() == at::kFloat && panels.scalar_type() == at::kFloat, "panel_linear: float32 only");
  TORCH_CHECK(panels.dim() == 3 && panels.size(2) == V && panels.is_contiguous(),
              "panel_linear: panels must be [N/", V, ", K, ", V, "] and contiguous");
  const int64_t K = panels.size(1), panel_total = panels.size(0), N = panel_total * V;
  TORCH_CHECK(x.size(-1) == K, "panel_linear: x has ", x.size(-1), " features, the weight ", K);
  const at::Tensor rows_in = x.reshape({-1, K}).contiguous();  // [M, K]
  const int64_t M = rows_in.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xs = static_cast<const float*>(rows_in.const_data_ptr());
  const float* ws = static_cast<const float*>(panels.const_data_ptr());
  float* ys = static_cast<float*>(y.mutable_data_ptr());
  const int64_t groups = (panel_total + PANELS - 1) / PANELS;
  // Threads split the panels; each streams its own panels once per tile of rows.
  at::parallel_for(0, groups, 1, [&](int64_t first, int64_t last) {
    for (int64_t g = first; g < last; ++g) {
      const int64_t p = g * PANELS, count = std::min<int64_t>(PANELS, panel_total - p);
      for (int64_t m = 0; m < M; m += ROWS) {
        const int64_t rows = std::min<int64_t>(ROWS, M - m);
        tile_any(rows, count, xs + m * K, K, ws + p * K * V, ys + m * N + p * V, N);
      }
    }
  });
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  return y.view(sizes);
}

int64_t panel_width() { return V; }

}  // namespace

TORCH_LIBRARY(tokenferry, m) {
  m.def("panel_linear(Tensor x, Tensor panels) -> Tensor", &panel_linear);
  m.def("panel_width() -> int", &panel_width);
}
