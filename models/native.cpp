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
#include <vector>

namespace {

#if defined(__AVX512F__)
constexpr int64_t V = 16;  // floats per vector
using Vec = __m512;
inline Vec zero() { return _mm512_setzero_ps(); }
inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec splat(float x) { return _mm512_set1_ps(x); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec max(Vec a, Vec b) { return _mm512_max_ps(a, b); }
inline float sum(Vec v) { return _mm512_reduce_add_ps(v); }
inline Vec round(Vec v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline Vec pow2(Vec n) {  // 2^n for integral n in [-126, 127]
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
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
inline Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec max(Vec a, Vec b) { return _mm256_max_ps(a, b); }
inline float sum(Vec v) {  // a fixed tree: the same bits for the same lanes
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)));
}
inline Vec round(Vec v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline Vec pow2(Vec n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
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

// e^x for x <= 0 (softmax's shifted scores), to about 2 ulp: Cephes' expf, e^x = 2^n e^r with |r| <= ln2 / 2.
inline Vec exp_nonpositive(Vec x) {
  x = max(x, splat(-87.0f));  // below that e^x is under float's normal range: treat it as e^-87
  const Vec n = round(mul(x, splat(1.44269504088896341f)));
  Vec r = fma(n, splat(-0.693359375f), x);
  r = fma(n, splat(2.12194440e-4f), r);
  Vec p = splat(1.9875691500e-4f);
  p = fma(p, r, splat(1.3981999507e-3f));
  p = fma(p, r, splat(8.3334519073e-3f));
  p = fma(p, r, splat(4.1665795894e-2f));
  p = fma(p, r, splat(1.6666665459e-1f));
  p = fma(p, r, splat(5.0000001201e-1f));
  p = fma(mul(p, r), r, add(r, splat(1.0f)));
  return mul(p, pow2(n));
}

constexpr int64_t MAX_DIM = 256, MAX_GROUP = 16;

// One decode step's attention: a query of one token per row, over that row's cached keys and values.
//
// Every query head of a group reads its key-value head's columns once, and only the columns its mask keeps,
// in order: a row's result depends on its own kept columns alone, not on how much left padding its batch
// holds, so it is the same bits in any batch (as the panel kernel's rows are).
at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& mask, double scale) {
  // query [rows, heads, dim]; keys, values [rows, kv_heads, cols, dim]; mask [rows, cols] bool -> [rows, heads, dim]
  TORCH_CHECK(query.scalar_type() == at::kFloat && keys.scalar_type() == at::kFloat &&
                  values.scalar_type() == at::kFloat, "decode_attention: float32 only");
  TORCH_CHECK(query.dim() == 3 && keys.dim() == 4 && values.sizes() == keys.sizes(),
              "decode_attention: query [rows, heads, dim], keys and values [rows, kv_heads, cols, dim]");
  const int64_t rows = query.size(0), heads = query.size(1), dim = query.size(2);
  const int64_t kv_heads = keys.size(1), cols = keys.size(2);
  TORCH_CHECK(keys.size(0) == rows && keys.size(3) == dim, "decode_attention: keys do not match the query");
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0 && heads / kv_heads <= MAX_GROUP,
              "decode_attention: ", heads, " heads over ", kv_heads, " key-value heads");
  TORCH_CHECK(dim % V == 0 && dim <= MAX_DIM, "decode_attention: head size ", dim, " is not a multiple of ", V,
              " up to ", MAX_DIM);
  TORCH_CHECK(query.stride(2) == 1 && keys.stride(3) == 1 && values.stride(3) == 1,
              "decode_attention: each head's vector must be contiguous");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == rows && mask.size(1) == cols &&
                  mask.is_contiguous(), "decode_attention: mask must be [rows, cols] bool and contiguous");
  const int64_t group = heads / kv_heads, lanes = dim / V;
  at::Tensor out = at::empty({rows, heads, dim}, query.options());
  const float* qs = static_cast<const float*>(query.const_data_ptr());
  const float* ks = static_cast<const float*>(keys.const_data_ptr());
  const float* vs = static_cast<const float*>(values.const_data_ptr());
  const bool* ms = static_cast<const bool*>(mask.const_data_ptr());
  float* os = static_cast<float*>(out.mutable_data_ptr());
  const float scaling = static_cast<float>(scale);
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t first, int64_t last) {
    std::vector<int64_t> kept(cols);
    std::vector<float> scores(group * cols + V);  // [group][kept], then e^(score - max)
    for (int64_t task = first; task < last; ++task) {
      const int64_t r = task / kv_heads, h = task % kv_heads;
      int64_t n = 0;
      for (int64_t c = 0; c < cols; ++c)
        if (ms[r * cols + c]) kept[n++] = c;
      const float* k_head = ks + r * keys.stride(0) + h * keys.stride(1);
      const float* v_head = vs + r * values.stride(0) + h * values.stride(1);
      const float* q_group = qs + r * query.stride(0) + h * group * query.stride(1);
      float* o_group = os + (r * heads + h * group) * dim;
      if (n == 0) {  // nothing to attend to: zeros, where SDPA would give NaN
        std::fill(o_group, o_group + group * dim, 0.0f);
        continue;
      }
      Vec q[MAX_GROUP][MAX_DIM / V];
      for (int64_t g = 0; g < group; ++g)
        for (int64_t j = 0; j < lanes; ++j) q[g][j] = load(q_group + g * query.stride(1) + j * V);
      for (int64_t i = 0; i < n; ++i) {
        const float* k = k_head + kept[i] * keys.stride(2);
        for (int64_t g = 0; g < group; ++g) {
          Vec acc = mul(q[g][0], load(k));
          for (int64_t j = 1; j < lanes; ++j) acc = fma(q[g][j], load(k + j * V), acc);
          scores[g * n + i] = sum(acc) * scaling;
        }
      }
      float total[MAX_GROUP];
      for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * n;
        float top = s[0];
        for (int64_t i = 1; i < n; ++i) top = std::max(top, s[i]);
        const Vec shift = splat(-top);
        int64_t i = 0;
        for (; i + V <= n; i += V) store(s + i, exp_nonpositive(add(load(s + i), shift)));
        if (i < n) {  // the tail through a full vector: lanes past n are computed and dropped
          float tail[V] = {};
          std::copy(s + i, s + n, tail);
          store(tail, exp_nonpositive(add(load(tail), shift)));
          std::copy(tail, tail + (n - i), s + i);
        }
        float t = 0.0f;
        for (int64_t j = 0; j < n; ++j) t += s[j];
        total[g] = t;
      }
      Vec acc[MAX_GROUP][MAX_DIM / V];
      for (int64_t g = 0; g < group; ++g)
        for (int64_t j = 0; j < lanes; ++j) acc[g][j] = zero();
      for (int64_t i = 0; i < n; ++i) {
        const float* v = v_head + kept[i] * values.stride(2);
        for (int64_t g = 0; g < group; ++g) {
          const Vec p = splat(scores[g * n + i]);
          for (int64_t j = 0; j < lanes; ++j) acc[g][j] = fma(p, load(v + j * V), acc[g][j]);
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        const Vec inverse = splat(1.0f / total[g]);
        for (int64_t j = 0; j < lanes; ++j) store(o_group + g * dim + j * V, mul(acc[g][j], inverse));
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(tokenferry, m) {
  m.def("panel_linear(Tensor x, Tensor panels) -> Tensor", &panel_linear);
  m.def("panel_width() -> int", &panel_width);
  m.def("decode_attention(Tensor query, Tensor keys, Tensor values, Tensor mask, float scale) -> Tensor",
        &decode_attention);
}
