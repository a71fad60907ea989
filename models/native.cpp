// tokenferry's own CPU kernels, built once per machine by models/native.py and registered as torch.ops.tokenferry.*:
//
// - panel_linear: y = x W^T in float32 or bfloat16, over a weight packed into panels of V output columns, so
//   that a tile of rows streams each panel once, in order. At one row a decode step is a pass over the
//   weights, and oneDNN reads them at two thirds of what the machine streams; this reads them at its full rate.
// - attention: each query over its own row's kept columns (decode steps and prompts alike).
// - int8_linear and int4_linear: the quantized modes' matmuls over codes in panels, summed in float32; int4 codes
//   widen to bfloat16 with shifts and byte interleaves alone.
// - rms_norm, silu_mul and rotary: the decoder's norm, gated activation and rotary embedding, one call each.
// - argmax: greedy sampling's index of each row's largest logit, as torch.argmax, at memory speed.
// - decoder_layer: a decode step's layer, the operations above in one call.
//
// Batch invariance by construction: every output element is one fixed chain of operations over its own row's
// inputs (a matmul's: fused multiply-adds over k = 0..K-1 from zero), whatever tile, batch, padding or chunk
// computes it. A row's outputs are therefore the same bits in a call of 1 row or 70. Different instruction
// sets (AVX2, AVX-512, its bfloat16 dot product) sum differently; one machine always runs one of them.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
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
inline Vec sub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
inline Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec max(Vec a, Vec b) { return _mm512_max_ps(a, b); }
inline Vec min(Vec a, Vec b) { return _mm512_min_ps(a, b); }
inline Vec div(Vec a, Vec b) { return _mm512_div_ps(a, b); }
inline Vec where_nonnegative(Vec x, Vec a, Vec b) {  // x >= 0 ? a : b, lane by lane
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, zero(), _CMP_GE_OQ), b, a);
}
inline float sum(Vec v) { return _mm512_reduce_add_ps(v); }
inline uint32_t equal_lanes(Vec a, Vec b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }  // bit j: lane j
inline uint32_t nan_lanes(Vec a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }
inline Vec round(Vec v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline Vec pow2(Vec n) {  // 2^n for integral n in [-126, 127]
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
// A tile of 8 rows x 3 panels holds 24 accumulators, 3 weight vectors and a broadcast in the 32 registers; one of
// up to 4 rows takes 6 panels (24 + 6 + 1).
constexpr int ROWS = 8, PANELS = 3, FEW_ROWS = 4, FEW_PANELS = 6;
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int64_t V = 8;
using Vec = __m256;
inline Vec zero() { return _mm256_setzero_ps(); }
inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
inline Vec splat(float x) { return _mm256_set1_ps(x); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec sub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
inline Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec max(Vec a, Vec b) { return _mm256_max_ps(a, b); }
inline Vec min(Vec a, Vec b) { return _mm256_min_ps(a, b); }
inline Vec div(Vec a, Vec b) { return _mm256_div_ps(a, b); }
inline Vec where_nonnegative(Vec x, Vec a, Vec b) { return _mm256_blendv_ps(b, a, _mm256_cmp_ps(x, zero(), _CMP_GE_OQ)); }
inline uint32_t equal_lanes(Vec a, Vec b) { return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_EQ_OQ)); }
inline uint32_t nan_lanes(Vec a) { return _mm256_movemask_ps(_mm256_cmp_ps(a, a, _CMP_UNORD_Q)); }
inline float sum(Vec v) {  // a fixed tree: the same bits for the same lanes
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)));
}
inline Vec round(Vec v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline Vec pow2(Vec n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
// 12 accumulators, 3 weight vectors and a broadcast: the 16 registers. Up to 2 rows take 6 panels: 12
// accumulators, and the weights read from memory by the multiply-adds.
constexpr int ROWS = 4, PANELS = 3, FEW_ROWS = 2, FEW_PANELS = 6;
#else
#error "models/native.cpp needs AVX2 and FMA, or AVX-512"
#endif

using bf16 = uint16_t;  // bfloat16's bits: the high half of a float32

// bfloat16 lanes to float32 and back, V at a time. Rounding is to nearest, ties to even, as PyTorch's cast
// (`round_bf16`: rounded and back to float32, what a bfloat16 tensor would hold).
#if defined(__AVX512F__)
using Bits = __m512i;  // V lanes of 32 bits
inline Bits load_bits(const bf16* p) { return _mm512_loadu_si512(p); }  // 2 V bfloat16
inline Bits splat_bits(uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }
inline Vec low_halves(Bits b) { return _mm512_castsi512_ps(_mm512_slli_epi32(b, 16)); }
inline Vec high_halves(Bits b) { return _mm512_castsi512_ps(_mm512_and_si512(b, _mm512_set1_epi32(-65536))); }
inline Vec load_bf16(const bf16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
// v's bits with the bfloat16 it rounds to in the high half (the low half is then to be dropped).
inline Bits rounded_bits(Vec v) {
  const __m512i u = _mm512_castps_si512(v);
  return _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
}
inline Vec round_bf16(Vec v) { return high_halves(rounded_bits(v)); }
inline void store_bf16(bf16* p, Vec v) {
  _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded_bits(v), 16)));
}
#else
using Bits = __m256i;
inline Bits load_bits(const bf16* p) { return _mm256_loadu_si256((const __m256i*)p); }
inline Bits splat_bits(uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }
inline Vec low_halves(Bits b) { return _mm256_castsi256_ps(_mm256_slli_epi32(b, 16)); }
inline Vec high_halves(Bits b) { return _mm256_castsi256_ps(_mm256_and_si256(b, _mm256_set1_epi32(-65536))); }
inline Vec load_bf16(const bf16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
inline Bits rounded_bits(Vec v) {
  const __m256i u = _mm256_castps_si256(v);
  return _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
}
inline Vec round_bf16(Vec v) { return high_halves(rounded_bits(v)); }
inline void store_bf16(bf16* p, Vec v) {
  const __m256i u = _mm256_srli_epi32(rounded_bits(v), 16);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(u, u), 0xD8);
  _mm_storeu_si128((__m128i*)p, _mm256_castsi256_si128(packed));
}
#endif

// The kernels below are templated on the element type; these give a tensor's data as one and dispatch on it.
template <typename T>
const T* read(const at::Tensor& t) { return static_cast<const T*>(t.const_data_ptr()); }
template <typename T>
T* write(at::Tensor& t) { return static_cast<T*>(t.mutable_data_ptr()); }
template <typename F>
void with_type(at::ScalarType dtype, F&& f) {  // f(float{}) or f(bf16{}): dtype is float32 or bfloat16, checked
  if (dtype == at::kFloat) f(float{});
  else f(bf16{});
}

inline float to_float(bf16 b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline Vec load_any(const float* p) { return load(p); }
inline Vec load_any(const bf16* p) { return load_bf16(p); }
inline void store_any(float* p, Vec v) { store(p, v); }
inline void store_any(bf16* p, Vec v) { store_bf16(p, v); }

// acc + x_k w_k + x_k+1 w_k+1 in every lane, from a pair of inputs and a vector of V pairs of weights. With
// AVX512-BF16 one dot-product instruction; otherwise two FMAs in float32. Either way the same for every tile.
inline Vec pair_fma(Bits x_pair, Bits w_pairs, Vec acc) {
#if defined(__AVX512BF16__)
  return _mm512_dpbf16_ps(acc, (__m512bh)x_pair, (__m512bh)w_pairs);
#else
  return fma(high_halves(x_pair), high_halves(w_pairs), fma(low_halves(x_pair), low_halves(w_pairs), acc));
#endif
}

// A weight vector of V float32 lanes: float32 as it is, int8 codes widened (exactly).
inline Vec load_weight(const float* p) { return load(p); }
#if defined(__AVX512F__)
inline Vec load_weight(const int8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))); }
#else
inline Vec load_weight(const int8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p))); }
#endif
inline float to_float(float x) { return x; }

// out[r][p*V + j] = sum over k of x[r][k] * W[p*V + j][k], for R rows and P panels, k in order, times the
// column's scale for int8 weights. Panels of float32 or int8 weights are [K][V] (panel p, then k, then the
// column), multiplied in float32 with the rows widened to it; bfloat16 ones hold pairs of k per column,
// [K/2][V][2], the layout the dot-product instruction reads, and take bfloat16 rows.
template <typename T, typename W, int R, int P>
void tile(const T* x, int64_t K, const W* panels, const float* scales, T* out, int64_t out_stride) {
  Vec acc[R][P];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) acc[r][p] = zero();
  const int64_t panel_stride = K * V;
  if constexpr (!std::is_same_v<W, bf16>) {
    for (int64_t k = 0; k < K; ++k) {
      Vec w[P];
      for (int p = 0; p < P; ++p) w[p] = load_weight(panels + p * panel_stride + k * V);
      for (int r = 0; r < R; ++r) {
        const Vec xr = splat(to_float(x[r * K + k]));
        for (int p = 0; p < P; ++p) acc[r][p] = fma(xr, w[p], acc[r][p]);
      }
    }
  } else {
    for (int64_t k = 0; k < K; k += 2) {
      Bits w[P];
      for (int p = 0; p < P; ++p) w[p] = load_bits(panels + p * panel_stride + k * V);
      for (int r = 0; r < R; ++r) {
        uint32_t pair;
        std::memcpy(&pair, x + r * K + k, sizeof pair);
        const Bits xr = splat_bits(pair);
        for (int p = 0; p < P; ++p) acc[r][p] = pair_fma(xr, w[p], acc[r][p]);
      }
    }
  }
  for (int p = 0; p < P; ++p) {
    const Vec scale = scales ? load(scales + p * V) : splat(1.0f);
    for (int r = 0; r < R; ++r) store_any(out + r * out_stride + p * V, scales ? mul(acc[r][p], scale) : acc[r][p]);
  }
}

// The tile for `rows` <= ROWS rows and `panel_count` <= PANELS panels: the edges of the output.
template <typename T, typename W, int R = ROWS, int P = PANELS>
void tile_any(int64_t rows, int64_t panel_count, const T* x, int64_t K, const W* panels, const float* scales, T* out,
              int64_t out_stride) {
  if constexpr (R > 1) {
    if (rows < R) return tile_any<T, W, R - 1, P>(rows, panel_count, x, K, panels, scales, out, out_stride);
  }
  if constexpr (P > 1) {
    if (panel_count < P) return tile_any<T, W, R, P - 1>(rows, panel_count, x, K, panels, scales, out, out_stride);
  }
  tile<T, W, R, P>(x, K, panels, scales, out, out_stride);
}

// The loop of every panel kernel: threads split the panels, P at a time, and each streams its own panels once
// per tile of R rows, calling tile(first row, rows, first panel, panels) with rows <= R and panels <= P.
template <int R, int P, typename Tile>
void over_tiles(int64_t M, int64_t panel_total, const Tile& tile) {
  at::parallel_for(0, (panel_total + P - 1) / P, 1, [&](int64_t first, int64_t last) {
    for (int64_t g = first; g < last; ++g) {
      const int64_t p = g * P, count = std::min<int64_t>(P, panel_total - p);
      for (int64_t m = 0; m < M; m += R) tile(m, std::min<int64_t>(R, M - m), p, count);
    }
  });
}

template <typename T, typename W, int R, int P>
void panels_times_in(const T* xs, int64_t M, int64_t K, const W* ws, const float* scales, int64_t panel_total, T* ys) {
  const int64_t N = panel_total * V;
  over_tiles<R, P>(M, panel_total, [&](int64_t m, int64_t rows, int64_t p, int64_t count) {
    tile_any<T, W, R, P>(rows, count, xs + m * K, K, ws + p * K * V, scales ? scales + p * V : nullptr,
                         ys + m * N + p * V, N);
  });
}

// A few rows (a decode step of one stream, or of a handful) are a pass over the weights: tiles of more panels
// keep more weight streams and more independent sums in flight, and read them at the machine's streaming rate:
// over SmolLM2's weights 3 panels a tile was 5-13% slower at 1 to 4 rows with the AVX-512 build, 8-19% at 1 and 2
// with the AVX2 one (a 2-core AVX-512 EPYC). The tile's shape never changes a sum: each output is the same chain
// over k whatever tile computes it.
template <typename T, typename W>
void panels_times(const T* xs, int64_t M, int64_t K, const W* ws, const float* scales, int64_t panel_total, T* ys) {
  if (M <= FEW_ROWS) return panels_times_in<T, W, FEW_ROWS, FEW_PANELS>(xs, M, K, ws, scales, panel_total, ys);
  panels_times_in<T, W, ROWS, PANELS>(xs, M, K, ws, scales, panel_total, ys);
}

// x [..., K] as [M, K] rows, contiguous, and the output [M, N] in x's dtype; `done` gives it back as [..., N].
struct Rows {
  at::Tensor in, out;
  at::Tensor done(const at::Tensor& x) const {
    auto sizes = x.sizes().vec();
    sizes.back() = out.size(1);
    return out.view(sizes);
  }
};
Rows rows_of(const at::Tensor& x, int64_t K, int64_t N) {
  at::Tensor in = x.reshape({-1, K}).contiguous();
  return {in, at::empty({in.size(0), N}, x.options())};
}

// Panels for inputs of K features in `dtype` (float32 or bfloat16): [N/V, K, V] contiguous. Returns N.
int64_t check_panels(const char* op, const at::Tensor& panels, int64_t K, at::ScalarType dtype) {
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && panels.scalar_type() == dtype,
              op, ": float32 or bfloat16, the input's and the panels' alike");
  TORCH_CHECK(panels.dim() == 3 && panels.size(2) == V && panels.is_contiguous(),
              op, ": panels must be [N/", V, ", K, ", V, "] and contiguous");
  TORCH_CHECK(K == panels.size(1), op, ": x has ", K, " features, the weight ", panels.size(1));
  TORCH_CHECK(dtype == at::kFloat || K % 2 == 0, op, ": bfloat16 needs an even number of features");
  return panels.size(0) * V;
}

// int8 weights for inputs of K features: codes [N/V, K, V] int8 and scales [N] float32, contiguous. Returns N.
int64_t check_int8(const char* op, const at::Tensor& codes, const at::Tensor& scales, int64_t K) {
  TORCH_CHECK(codes.scalar_type() == at::kChar && codes.dim() == 3 && codes.size(2) == V && codes.is_contiguous(),
              op, ": codes must be [N/", V, ", K, ", V, "] int8 and contiguous");
  TORCH_CHECK(K == codes.size(1), op, ": x has ", K, " features, the weight ", codes.size(1));
  const int64_t N = codes.size(0) * V;
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 1 && scales.size(0) == N && scales.is_contiguous(),
              op, ": scales must be [", N, "] float32 and contiguous");
  return N;
}

at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& panels) {
  // x [..., K]; panels [N/V, K, V] contiguous, in x's dtype (float32 or bfloat16) -> [..., N]
  const auto dtype = x.scalar_type();
  const int64_t K = x.size(-1), panel_total = check_panels("panel_linear", panels, K, dtype) / V;
  Rows rows = rows_of(x, K, panel_total * V);
  with_type(dtype, [&](auto type) {
    using T = decltype(type);
    panels_times<T, T>(read<T>(rows.in), rows.in.size(0), K, read<T>(panels), nullptr, panel_total, write<T>(rows.out));
  });
  return rows.done(x);
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales) {
  // x [..., K] float32 or bfloat16; codes [N/V, K, V] int8; scales [N] float32 -> [..., N] in x's dtype
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "int8_linear: x must be float32 or bfloat16");
  const int64_t K = x.size(-1), N = check_int8("int8_linear", codes, scales, K), panel_total = N / V;
  Rows rows = rows_of(x, K, N);
  with_type(dtype, [&](auto type) {
    using T = decltype(type);
    panels_times<T, int8_t>(read<T>(rows.in), rows.in.size(0), K, read<int8_t>(codes), read<float>(scales),
                            panel_total, write<T>(rows.out));
  });
  return rows.done(x);
}

int64_t panel_width() { return V; }

// ---- int4 weights: y = x W^T with W = (q - 8) s + z, q a 4-bit code, s and z one per group of 32 inputs.
//
// Codes are packed in panels of V columns, [N/V][K/8][4V] bytes: a block of 4V bytes holds the column's codes
// for 8 k, two to a byte. The byte at 16 (j / 4) + 8 h + 2 (j % 4) + t of column j's block holds k0 + 2h + t in
// its low nibble and k0 + 4 + 2h + t in its high one (models/quant.py's Int4PanelLinear packs them so): in each
// 16-byte lane, byte pairs are one column's pair of k, the layout both products below read.
//
// Each group adds to the output s D + c X, from X = sum x (the group's inputs, in k order) and a dot product
// D of the inputs and codes, summed in float32. Batch invariance: D and X are a row's own, in a fixed order.
// - AVX-512: D = sum x (16 + q) with the bfloat16 dot product (or its emulation in float32 FMAs), c = z - 24 s.
//   16 + q is exactly the bfloat16 0x4180 | q << 3, so codes widen with shifts, masks and byte interleaves alone;
//   rows are bfloat16, a float32 input rounded to it first, as PyTorch's int4 kernel does.
// - AVX2: D = d sum x_i q in integers, exactly: each group of a row quantized to 16 bits, d = max |x| / 32767,
//   x_i = x / d rounded to nearest, and c = z - 8 s. The codes widen to 16 bits with masks and byte interleaves,
//   and a pair of inputs meets a pair of codes in one multiply-add (_mm256_madd_epi16): fewer instructions than
//   widening both to floats, which bound this CPU's int4 step, not its memory. (Inputs in 8 bits, as llama.cpp's
//   q8_1, took a third fewer but changed the first 8 greedy tokens of 7 of 12 answers against float32, where
//   bfloat16 inputs changed 2.)
constexpr int64_t GROUP = 32, BLOCK = 8;
#if defined(__AVX512F__)
// 8 rows x 1 panel: 8 dot products, 8 sums and 4 weight vectors. Past 8 rows, 8 x 2 panels (each input pair
// broadcast once for both; the sums may spill): 2-6% faster at 9 to 128 rows over SmolLM2's layers, 30% slower at
// 1 to 4 (a 2-core AVX-512 EPYC). 8 x 3 was 10-20% slower.
constexpr int Q_ROWS = 8, Q_PANELS = 2;
// The rows as the tile reads them: bfloat16 where the dot-product instruction multiplies pairs of it, else widened
// back to float32 once per call (a tile then broadcasts each input as it is, not a pair split by shifts).
#if defined(__AVX512BF16__)
using QIn = bf16;
#else
using QIn = float;
#endif
struct Int4Rows {
  const QIn* x;       // [M, K]
  const float* sums;  // X: [M, K/32]
  int64_t K;
  Int4Rows from(int64_t m) const { return {x + m * K, sums + m * (K / GROUP), K}; }
};
// A block's codes as the 4 vectors of bfloat16 pairs (k0 + 2j, k0 + 2j + 1) of its V columns: each nibble moved
// to bits 3..6 of its byte with 0x80 set, interleaved with 0x41 (ternary-logic 0xEA is (A & B) | C).
inline void widen_block(const uint8_t* p, Bits w[4]) {
  const __m512i b = _mm512_loadu_si512(p), mask = _mm512_set1_epi8(0x78), low = _mm512_set1_epi8(char(0x80));
  const __m512i lo = _mm512_ternarylogic_epi32(_mm512_slli_epi16(b, 3), mask, low, 0xEA);
  const __m512i hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(b, 1), mask, low, 0xEA);
  const __m512i top = _mm512_set1_epi8(0x41);
  w[0] = _mm512_unpacklo_epi8(lo, top), w[1] = _mm512_unpackhi_epi8(lo, top);
  w[2] = _mm512_unpacklo_epi8(hi, top), w[3] = _mm512_unpackhi_epi8(hi, top);
}

// out[r][p V + j] for R rows and P panels of V columns. Each panel's codes [K/8][4V] bytes, code_stride apart; its
// scale_zeros [K/32][2][V] bfloat16.
template <typename T, int R, int P>
void int4_tile(const Int4Rows& rows, const uint8_t* codes, const bf16* scale_zeros, T* out, int64_t out_stride) {
  const int64_t K = rows.K, groups = K / GROUP, code_stride = K / 2 * V, scale_stride = groups * 2 * V;
  Vec acc[R][P];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) acc[r][p] = zero();
  for (int64_t g = 0; g < groups; ++g) {
    Vec dot[R][P];
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < P; ++p) dot[r][p] = zero();
    for (int64_t k = g * GROUP; k < (g + 1) * GROUP; k += BLOCK) {
      Bits w[P][4];
      for (int p = 0; p < P; ++p) widen_block(codes + p * code_stride + k / 2 * V, w[p]);
      for (int j = 0; j < 4; ++j)
        for (int r = 0; r < R; ++r) {
          const QIn* x = rows.x + r * K + k + 2 * j;
#if defined(__AVX512BF16__)
          uint32_t pair;
          std::memcpy(&pair, x, sizeof pair);
          const Bits xr = splat_bits(pair);
          for (int p = 0; p < P; ++p) dot[r][p] = pair_fma(xr, w[p][j], dot[r][p]);
#else
          const Vec x0 = splat(x[0]), x1 = splat(x[1]);  // pair_fma's order: k, then k + 1
          for (int p = 0; p < P; ++p) dot[r][p] = fma(x1, high_halves(w[p][j]), fma(x0, low_halves(w[p][j]), dot[r][p]));
#endif
        }
    }
    for (int p = 0; p < P; ++p) {
      const bf16* scale_zero = scale_zeros + p * scale_stride + g * 2 * V;
      const Vec s = load_bf16(scale_zero), offset = fma(splat(-24.0f), s, load_bf16(scale_zero + V));
      for (int r = 0; r < R; ++r)
        acc[r][p] = fma(s, dot[r][p], fma(offset, splat(rows.sums[r * groups + g]), acc[r][p]));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) store_any(out + r * out_stride + p * V, acc[r][p]);
}

// The rows rounded to bfloat16 (to nearest, ties to even, as PyTorch) as the tile reads them, unless they already
// are, and X of each row's groups, summed in k order.
struct Int4Input {
  std::vector<QIn> rounded;
  std::vector<float> sums;
  Int4Rows rows;
  template <typename T>
  Int4Input(const T* in, int64_t M, int64_t K) : sums(M * (K / GROUP)) {
    constexpr bool as_is = std::is_same_v<T, bf16> && std::is_same_v<QIn, bf16>;
    if (!as_is) rounded.resize(M * K);
    const QIn* xs = as_is ? reinterpret_cast<const QIn*>(in) : rounded.data();
    at::parallel_for(0, M, 16, [&](int64_t first, int64_t last) {
      for (int64_t i = first * K; !as_is && i < last * K; i += V) {
        const Vec v = std::is_same_v<T, float> ? round_bf16(load_any(in + i)) : load_any(in + i);
        store_any(rounded.data() + i, v);  // already rounded: storing it as bfloat16 is exact
      }
      for (int64_t i = first * (K / GROUP); i < last * (K / GROUP); ++i) {
        float total = 0.0f;
        for (int64_t k = 0; k < GROUP; ++k) total += to_float(xs[i * GROUP + k]);
        sums[i] = total;
      }
    });
    rows = {xs, sums.data(), K};
  }
};
#else
// 4 rows x 1 panel: 4 sums and 4 dot products (32-bit integers, whose adds do not chain on a float latency).
constexpr int Q_ROWS = 4, Q_PANELS = 1;
struct Int4Rows {
  const int16_t* x;     // [M, K]: x_i
  const float* scales;  // d: [M, K/32]
  const float* sums;    // X: [M, K/32]
  int64_t K;
  Int4Rows from(int64_t m) const { return {x + m * K, scales + m * (K / GROUP), sums + m * (K / GROUP), K}; }
};

template <typename T, int R, int P>
void int4_tile(const Int4Rows& rows, const uint8_t* codes, const bf16* scale_zeros, T* out, int64_t out_stride) {
  const int64_t K = rows.K, groups = K / GROUP, code_stride = K / 2 * V, scale_stride = groups * 2 * V;
  const __m256i nibble = _mm256_set1_epi8(0x0F), none = _mm256_setzero_si256();
  Vec acc[R][P];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) acc[r][p] = zero();
  for (int64_t g = 0; g < groups; ++g) {
    __m256i dot[R][P];  // sum of x_i q per column, exact
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < P; ++p) dot[r][p] = none;
    for (int64_t k = g * GROUP; k < (g + 1) * GROUP; k += BLOCK) {
      __m256i w[P][4];  // 16-bit codes of the pairs (k + 2j, k + 2j + 1) of the V columns, as the bfloat16 pairs above
      for (int p = 0; p < P; ++p) {
        const __m256i b = _mm256_loadu_si256((const __m256i*)(codes + p * code_stride + k / 2 * V));
        const __m256i lo = _mm256_and_si256(b, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), nibble);
        w[p][0] = _mm256_unpacklo_epi8(lo, none), w[p][1] = _mm256_unpackhi_epi8(lo, none);
        w[p][2] = _mm256_unpacklo_epi8(hi, none), w[p][3] = _mm256_unpackhi_epi8(hi, none);
      }
      for (int j = 0; j < 4; ++j)
        for (int r = 0; r < R; ++r) {
          int32_t pair;
          std::memcpy(&pair, rows.x + r * K + k + 2 * j, sizeof pair);
          const __m256i xr = _mm256_set1_epi32(pair);
          for (int p = 0; p < P; ++p) dot[r][p] = _mm256_add_epi32(dot[r][p], _mm256_madd_epi16(w[p][j], xr));
        }
    }
    for (int p = 0; p < P; ++p) {
      const bf16* scale_zero = scale_zeros + p * scale_stride + g * 2 * V;
      const Vec s = load_bf16(scale_zero), offset = fma(splat(-8.0f), s, load_bf16(scale_zero + V));
      for (int r = 0; r < R; ++r) {
        const Vec scaled = mul(s, splat(rows.scales[r * groups + g]));
        acc[r][p] = fma(scaled, _mm256_cvtepi32_ps(dot[r][p]), fma(offset, splat(rows.sums[r * groups + g]), acc[r][p]));
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) store_any(out + r * out_stride + p * V, acc[r][p]);
}

// Each group of a row quantized to 16 bits, its d and its exact X (float32, in k order).
struct Int4Input {
  std::vector<int16_t> x;
  std::vector<float> scales, sums;
  Int4Rows rows;
  template <typename T>
  Int4Input(const T* in, int64_t M, int64_t K) : x(M * K), scales(M * (K / GROUP)), sums(M * (K / GROUP)) {
    at::parallel_for(0, M * (K / GROUP), 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {  // group i: inputs [i * 32, i * 32 + 32) of the [M, K] rows
        Vec v[GROUP / V];
        alignas(32) float values[GROUP], tops[V];
        Vec top = zero();
        for (int64_t n = 0; n < GROUP / V; ++n) {
          v[n] = load_any(in + i * GROUP + n * V);
          store(values + n * V, v[n]);
          top = max(top, max(v[n], sub(zero(), v[n])));
        }
        store(tops, top);
        float total = 0.0f, largest = 0.0f;
        for (int64_t k = 0; k < GROUP; ++k) total += values[k];
        for (int64_t k = 0; k < V; ++k) largest = std::max(largest, tops[k]);
        sums[i] = total;
        scales[i] = largest / 32767.0f;
        const Vec inverse = splat(largest > 0.0f ? 32767.0f / largest : 0.0f);
        for (int64_t n = 0; n < GROUP / V; ++n) {
          const __m256i q = _mm256_cvtps_epi32(mul(v[n], inverse));  // to nearest, ties to even; |q| <= 32767
          _mm_storeu_si128((__m128i*)(x.data() + i * GROUP + n * V),
                           _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)));
        }
      }
    });
    rows = {x.data(), scales.data(), sums.data(), K};
  }
};
#endif

// The tile for `rows` <= R rows and `panel_count` <= P panels: the edges of the output.
template <typename T, int R, int P>
void int4_tile_any(int64_t rows, int64_t panel_count, const Int4Rows& in, const uint8_t* codes,
                   const bf16* scale_zeros, T* out, int64_t out_stride) {
  if constexpr (R > 1) {
    if (rows < R) return int4_tile_any<T, R - 1, P>(rows, panel_count, in, codes, scale_zeros, out, out_stride);
  }
  if constexpr (P > 1) {
    if (panel_count < P) return int4_tile_any<T, R, P - 1>(rows, panel_count, in, codes, scale_zeros, out, out_stride);
  }
  int4_tile<T, R, P>(in, codes, scale_zeros, out, out_stride);
}

template <typename T, int P>
void int4_times(const Int4Rows& in, int64_t M, const uint8_t* codes, const bf16* scale_zeros, int64_t panel_total, T* ys) {
  const int64_t K = in.K, N = panel_total * V, groups = K / GROUP;
  over_tiles<Q_ROWS, P>(M, panel_total, [&](int64_t m, int64_t rows, int64_t p, int64_t count) {
    int4_tile_any<T, Q_ROWS, P>(rows, count, in.from(m), codes + p * K / 2 * V, scale_zeros + p * groups * 2 * V,
                                ys + m * N + p * V, N);
  });
}

// xs [M, K] -> ys [M, N]: the int4 product of rows, over codes and scale_zeros checked by `check_int4`.
template <typename T>
void int4_times_rows(const T* xs, int64_t M, int64_t K, const uint8_t* codes, const bf16* scale_zeros, int64_t panel_total,
                     T* ys) {
  const Int4Input input(xs, M, K);
  if (M <= Q_ROWS) int4_times<T, 1>(input.rows, M, codes, scale_zeros, panel_total, ys);
  else int4_times<T, Q_PANELS>(input.rows, M, codes, scale_zeros, panel_total, ys);
}

// int4 weights for inputs of K features: codes [N/V, K/2, V] uint8 and scale_zeros [N/V, K/32, 2, V] bfloat16,
// contiguous. Returns N.
int64_t check_int4(const char* op, const at::Tensor& codes, const at::Tensor& scale_zeros, int64_t K) {
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 3 && codes.size(2) == V && codes.is_contiguous(),
              op, ": codes must be [N/", V, ", K/2, ", V, "] uint8 and contiguous");
  const int64_t panel_total = codes.size(0), features = codes.size(1) * 2, groups = features / GROUP;
  TORCH_CHECK(features % GROUP == 0, op, ": ", features, " features is not a multiple of ", GROUP);
  TORCH_CHECK(K == features, op, ": x has ", K, " features, the weight ", features);
  TORCH_CHECK(scale_zeros.scalar_type() == at::kBFloat16 && scale_zeros.is_contiguous() && scale_zeros.dim() == 4 &&
                  scale_zeros.size(0) == panel_total && scale_zeros.size(1) == groups && scale_zeros.size(2) == 2 &&
                  scale_zeros.size(3) == V,
              op, ": scale_zeros must be [", panel_total, ", ", groups, ", 2, ", V, "] bfloat16, contiguous");
  return panel_total * V;
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale_zeros) {
  // x [..., K] float32 or bfloat16; codes [N/V, K/2, V] uint8; scale_zeros [N/V, K/32, 2, V] bfloat16
  // -> [..., N] in x's dtype
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "int4_linear: x must be float32 or bfloat16");
  const int64_t K = x.size(-1), N = check_int4("int4_linear", codes, scale_zeros, K);
  Rows rows = rows_of(x, K, N);
  with_type(dtype, [&](auto type) {
    using T = decltype(type);
    int4_times_rows(read<T>(rows.in), rows.in.size(0), K, read<uint8_t>(codes), read<bf16>(scale_zeros), codes.size(0),
                    write<T>(rows.out));
  });
  return rows.done(x);
}

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

// What a tensor of T holds after an operation computed in float32: bfloat16 rounds, float32 is as is.
template <typename T>
inline Vec as_stored(Vec v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else return round_bf16(v);
}

// Rows of [rows, width] in float32 or bfloat16, contiguous, width a multiple of V: the only shape the
// element-wise kernels below take.
void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK((x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) && x.dim() == 2 &&
                  x.is_contiguous() && x.size(1) % V == 0,
              name, ": [rows, a multiple of ", V, "] float32 or bfloat16, contiguous");
}

// RMSNorm as transformers' LlamaRMSNorm computes it, each row on its own: in float32 x rsqrt(mean(x^2) + eps)
// w; in bfloat16 the normalized row is rounded to bfloat16 before the weight scales it, and again after.
template <typename T>
void norm_rows(const T* xs, const T* ws, int64_t rows, int64_t hidden, float eps, T* os) {
  at::parallel_for(0, rows, 16, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const T* row = xs + r * hidden;
      Vec squares = zero();
      for (int64_t j = 0; j < hidden; j += V) squares = fma(load_any(row + j), load_any(row + j), squares);
      const Vec inverse = splat(1.0f / std::sqrt(sum(squares) / static_cast<float>(hidden) + eps));
      for (int64_t j = 0; j < hidden; j += V)
        store_any(os + r * hidden + j, mul(as_stored<T>(mul(load_any(row + j), inverse)), load_any(ws + j)));
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "rms_norm");  // x [rows, hidden]; weight [hidden] -> [rows, hidden]
  const int64_t rows = x.size(0), hidden = x.size(1);
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.dim() == 1 && weight.size(0) == hidden &&
                  weight.is_contiguous(), "rms_norm: weight must be [", hidden, "] in x's dtype");
  at::Tensor out = at::empty_like(x);
  with_type(x.scalar_type(), [&](auto type) {
    using T = decltype(type);
    norm_rows(read<T>(x), read<T>(weight), rows, hidden, static_cast<float>(eps), write<T>(out));
  });
  return out;
}

// silu(gate) * up, the gated MLP's activation, as PyTorch's two operations give it (in bfloat16 each rounds).
template <typename T>
void silu_mul_rows(const T* xs, int64_t rows, int64_t width, T* os) {
  at::parallel_for(0, rows * width / V, 64, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      const int64_t r = i * V / width, j = i * V % width;
      const Vec gate = load_any(xs + r * 2 * width + j), up = load_any(xs + r * 2 * width + width + j);
      // sigmoid(g) from e = e^-|g| <= 1, so that exp never overflows: 1 / (1 + e) for g >= 0, e / (1 + e) below.
      const Vec e = exp_nonpositive(min(gate, mul(gate, splat(-1.0f))));
      const Vec sigmoid = div(where_nonnegative(gate, splat(1.0f), e), add(splat(1.0f), e));
      store_any(os + r * width + j, mul(as_stored<T>(mul(gate, sigmoid)), up));
    }
  });
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "silu_mul");  // gate_up [rows, 2 I]: gate, then up -> [rows, I]
  const int64_t rows = gate_up.size(0), width = gate_up.size(1) / 2;
  TORCH_CHECK(width % V == 0, "silu_mul: each half must be a multiple of ", V);
  at::Tensor out = at::empty({rows, width}, gate_up.options());
  with_type(gate_up.scalar_type(), [&](auto type) {
    using T = decltype(type);
    silu_mul_rows(read<T>(gate_up), rows, width, write<T>(out));
  });
  return out;
}

// Rotary embedding of the first `turned` heads of each token, as transformers' apply_rotary_pos_emb computes it:
// x cos + rotate_half(x) sin, rotate_half(x) = (-x2, x1), every product and the sum rounded to the dtype as
// PyTorch's three operations round them (the library is built without contracting them into FMAs).
template <typename T>
void rotate_rows(const T* xs, const T* coss, const T* sins, int64_t tokens, int64_t heads, int64_t turned,
                 int64_t dim, T* os) {
  const int64_t half = dim / 2;
  at::parallel_for(0, tokens * turned, 64, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      const int64_t token = i / turned, head = i % turned;
      const T* x = xs + (token * heads + head) * dim;
      const T *c = coss + token * dim, *s = sins + token * dim;
      T* o = os + i * dim;
      for (int64_t j = 0; j < half; j += V) {
        const Vec x1 = load_any(x + j), x2 = load_any(x + half + j);
        const Vec first_half = sub(as_stored<T>(mul(x1, load_any(c + j))), as_stored<T>(mul(x2, load_any(s + j))));
        const Vec second_half = add(as_stored<T>(mul(x2, load_any(c + half + j))), as_stored<T>(mul(x1, load_any(s + half + j))));
        store_any(o + j, first_half);
        store_any(o + half + j, second_half);
      }
    }
  });
}

at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t turned) {
  // x [rows, q, heads, dim]; cos, sin [rows, q, dim] -> the first `turned` heads turned: [rows, q, turned, dim]
  const auto dtype = x.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && cos.scalar_type() == dtype && sin.scalar_type() == dtype,
              "rotary: float32 or bfloat16, x, cos and sin alike");
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && cos.is_contiguous() && sin.is_contiguous(),
              "rotary: x [rows, q, heads, dim], cos and sin [rows, q, dim], contiguous");
  const int64_t rows = x.size(0), q = x.size(1), heads = x.size(2), dim = x.size(3);
  TORCH_CHECK(cos.dim() == 3 && cos.size(0) == rows && cos.size(1) == q && cos.size(2) == dim && sin.sizes() == cos.sizes(),
              "rotary: cos and sin must be [", rows, ", ", q, ", ", dim, "]");
  TORCH_CHECK(dim % (2 * V) == 0, "rotary: head size ", dim, " is not a multiple of ", 2 * V);
  TORCH_CHECK(0 < turned && turned <= heads, "rotary: ", turned, " heads to turn of ", heads);
  at::Tensor out = at::empty({rows, q, turned, dim}, x.options());
  with_type(dtype, [&](auto type) {
    using T = decltype(type);
    rotate_rows(read<T>(x), read<T>(cos), read<T>(sin), rows * q, heads, turned, dim, write<T>(out));
  });
  return out;
}

constexpr int64_t MAX_DIM = 256, MAX_GROUP = 16;

// Attention of each row's queries over that row's cached keys and values (a decode step: one query a row).
//
// Every query head of a group reads its key-value head's columns once, and only the columns its mask keeps,
// in order: a query's result depends on its own kept columns alone, not on how much left padding its batch
// holds nor on how its prompt was cut into chunks, so it is the same bits in any batch (as the panel
// kernel's rows are).
//
// Its operands as pointers and strides (of the first three dimensions; each head's vector is contiguous): query
// [rows, heads, queries, dim], keys and values [rows, kv_heads, cols, dim], mask [rows, queries, cols] and out
// [rows, queries, heads, dim], both contiguous.
template <typename T>
struct Attend {
  const T *query, *keys, *values;
  const bool* mask;
  T* out;
  int64_t rows, heads, queries, dim, kv_heads, cols;
  int64_t query_strides[3], key_strides[3], value_strides[3];
};

// LANES: vectors per head, dim / V, fixed at compile time for the common head sizes (0: read from dim).
template <typename T, int64_t LANES>
void attend_rows(const Attend<T>& a, float scaling) {
  const int64_t rows = a.rows, heads = a.heads, queries = a.queries, dim = a.dim, kv_heads = a.kv_heads, cols = a.cols;
  const int64_t group = heads / kv_heads, lanes = LANES ? LANES : dim / V;
  const int64_t *q_stride = a.query_strides, *k_stride = a.key_strides, *v_stride = a.value_strides;
  const T *qs = a.query, *ks = a.keys, *vs = a.values;
  const bool* ms = a.mask;
  T* os = a.out;
  at::parallel_for(0, rows * kv_heads * queries, 1, [&](int64_t first, int64_t last) {
    std::vector<int64_t> kept(cols);
    std::vector<float> scores(group * cols);  // [group][kept], then e^(score - max)
    for (int64_t task = first; task < last; ++task) {
      const int64_t r = task / (kv_heads * queries), h = task / queries % kv_heads, t = task % queries;
      int64_t n = 0;
      const bool* row_mask = ms + (r * queries + t) * cols;
      for (int64_t c = 0; c < cols; ++c)
        if (row_mask[c]) kept[n++] = c;
      const T* k_head = ks + r * k_stride[0] + h * k_stride[1];
      const T* v_head = vs + r * v_stride[0] + h * v_stride[1];
      const T* q_group = qs + r * q_stride[0] + h * group * q_stride[1] + t * q_stride[2];
      T* o_group = os + ((r * queries + t) * heads + h * group) * dim;  // out [rows, queries, heads, dim]
      if (n == 0) {  // nothing to attend to: zeros, where SDPA would give NaN
        std::fill(o_group, o_group + group * dim, T{});
        continue;
      }
      Vec q[MAX_GROUP][MAX_DIM / V];
      for (int64_t g = 0; g < group; ++g)
        for (int64_t j = 0; j < lanes; ++j) q[g][j] = load_any(q_group + g * q_stride[1] + j * V);
      for (int64_t i = 0; i < n; ++i) {
        const T* k = k_head + kept[i] * k_stride[2];
        Vec key[MAX_DIM / V];
        for (int64_t j = 0; j < lanes; ++j) key[j] = load_any(k + j * V);
        for (int64_t g = 0; g < group; ++g) {
          Vec acc = mul(q[g][0], key[0]);
          for (int64_t j = 1; j < lanes; ++j) acc = fma(q[g][j], key[j], acc);
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
        const T* v = v_head + kept[i] * v_stride[2];
        Vec value[MAX_DIM / V];
        for (int64_t j = 0; j < lanes; ++j) value[j] = load_any(v + j * V);
        for (int64_t g = 0; g < group; ++g) {
          const Vec p = splat(scores[g * n + i]);
          for (int64_t j = 0; j < lanes; ++j) acc[g][j] = fma(p, value[j], acc[g][j]);
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        const Vec inverse = splat(1.0f / total[g]);
        for (int64_t j = 0; j < lanes; ++j) store_any(o_group + g * dim + j * V, mul(acc[g][j], inverse));
      }
    }
  });
}

template <typename T>
void attend(const Attend<T>& a, float scaling) {
  switch (a.dim / V) {  // the head sizes of most models get loops the compiler unrolls
    case 4: return attend_rows<T, 4>(a, scaling);
    case 8: return attend_rows<T, 8>(a, scaling);
    default: return attend_rows<T, 0>(a, scaling);
  }
}

at::Tensor attention(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values, const at::Tensor& mask,
                     double scale) {
  // query [rows, heads, q, dim]; keys, values [rows, kv_heads, cols, dim]; mask [rows, q, cols] bool, true where
  // a query may attend -> [rows, q, heads, dim]
  const auto dtype = query.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && keys.scalar_type() == dtype &&
                  values.scalar_type() == dtype, "attention: float32 or bfloat16, query, keys and values alike");
  TORCH_CHECK(query.dim() == 4 && keys.dim() == 4 && values.sizes() == keys.sizes(),
              "attention: query [rows, heads, q, dim], keys and values [rows, kv_heads, cols, dim]");
  const int64_t rows = query.size(0), heads = query.size(1), queries = query.size(2), dim = query.size(3);
  const int64_t kv_heads = keys.size(1), cols = keys.size(2);
  TORCH_CHECK(keys.size(0) == rows && keys.size(3) == dim, "attention: keys do not match the query");
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0 && heads / kv_heads <= MAX_GROUP,
              "attention: ", heads, " heads over ", kv_heads, " key-value heads");
  TORCH_CHECK(dim % V == 0 && dim <= MAX_DIM, "attention: head size ", dim, " is not a multiple of ", V, " up to ",
              MAX_DIM);
  TORCH_CHECK(query.stride(3) == 1 && keys.stride(3) == 1 && values.stride(3) == 1,
              "attention: each head's vector must be contiguous");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 3 && mask.size(0) == rows && mask.size(1) == queries &&
                  mask.size(2) == cols && mask.is_contiguous(),
              "attention: mask must be [rows, q, cols] bool and contiguous");
  at::Tensor out = at::empty({rows, queries, heads, dim}, query.options());
  with_type(dtype, [&](auto type) {
    using T = decltype(type);
    attend(Attend<T>{read<T>(query), read<T>(keys), read<T>(values), read<bool>(mask), write<T>(out), rows, heads, queries,
                     dim, kv_heads, cols, {query.stride(0), query.stride(1), query.stride(2)},
                     {keys.stride(0), keys.stride(1), keys.stride(2)}, {values.stride(0), values.stride(1), values.stride(2)}},
           static_cast<float>(scale));
  });
  return out;
}

// ---- A decoder layer of a one-token-a-row forward (a decode step) in one call: the operations models/decoder.py
// calls one by one, called from here in the same order on the same kernels, so the same bits. At one row a
// layer's 15 operations through Python cost about 4 ms of a 22 ms float32 step on a 2-core AVX-512 EPYC; here
// each is a C++ call on pointers into one scratch buffer, without the ATen operations (views, allocations, adds)
// that took about a sixth of a one-row int4 step on a 2-core AVX2 EPYC while the other thread waited.

// A projection's weights as its module keeps them: panels [N/V, K, V] (float32 or bfloat16), or codes and their
// scales (int8 codes [N/V, K, V] and scales [N]; int4 codes [N/V, K/2, V] uint8 and scale_zeros), checked for
// inputs of K features in `dtype`. Returns N.
int64_t check_projection(at::TensorList weights, int64_t K, at::ScalarType dtype) {
  TORCH_CHECK(weights.size() == 1 || weights.size() == 2, "decoder_layer: a projection is its panels, or its codes and their scales");
  if (weights.size() == 1) return check_panels("decoder_layer", weights[0], K, dtype);
  if (weights[0].scalar_type() == at::kChar) return check_int8("decoder_layer", weights[0], weights[1], K);
  return check_int4("decoder_layer", weights[0], weights[1], K);
}

// xs [M, K] -> ys [M, N] through weights that `check_projection` passed.
template <typename T>
void project(const T* xs, int64_t M, int64_t K, at::TensorList weights, T* ys) {
  const at::Tensor& first = weights[0];
  if (weights.size() == 1) return panels_times<T, T>(xs, M, K, read<T>(first), nullptr, first.size(0), ys);
  if (first.scalar_type() == at::kChar)
    return panels_times<T, int8_t>(xs, M, K, read<int8_t>(first), read<float>(weights[1]), first.size(0), ys);
  int4_times_rows<T>(xs, M, K, read<uint8_t>(first), read<bf16>(weights[1]), first.size(0), ys);
}

// The new states of `rows` rows (each row's kv_heads vectors of `dim` side by side, rows `row_stride` apart) into
// column `column` of store rows [first_row, first_row + rows) ([store rows, kv_heads, columns, dim]).
template <typename T>
void write_column(const at::Tensor& store, int64_t first_row, int64_t column, const T* states, int64_t row_stride,
                  int64_t rows) {
  const int64_t heads = store.size(1), dim = store.size(3);
  T* to = static_cast<T*>(store.mutable_data_ptr());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t h = 0; h < heads; ++h)
      std::memcpy(to + (first_row + r) * store.stride(0) + h * store.stride(1) + column * store.stride(2),
                  states + r * row_stride + h * dim, dim * sizeof(T));
}

// out = a + b, n elements (a multiple of V), as PyTorch's add gives it (in bfloat16: the float32 sum, rounded).
template <typename T>
void add_rows(const T* a, const T* b, int64_t n, T* out) {
  at::parallel_for(0, n / V, 4096, [&](int64_t first, int64_t last) {
    for (int64_t i = first * V; i < last * V; i += V) store_any(out + i, add(load_any(a + i), load_any(b + i)));
  });
}

at::Tensor decoder_layer(const at::Tensor& hidden, const at::Tensor& input_norm, double input_eps,
                         const at::Tensor& post_norm, double post_eps, at::TensorList qkv, at::TensorList o,
                         at::TensorList gate_up, at::TensorList down, const at::Tensor& keys, const at::Tensor& values,
                         int64_t first_row, int64_t start, int64_t write_at, const at::Tensor& mask, const at::Tensor& cos,
                         const at::Tensor& sin, int64_t heads, double scaling) {
  // hidden [rows, H]; keys, values: the layer's store [store rows, kv_heads, columns, dim], this forward's rows at
  // first_row on; mask [rows, 1, write_at + 1 - start] bool; cos, sin [rows, 1, dim] -> the layer's output [rows, H]
  const auto dtype = hidden.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && hidden.dim() == 2 && hidden.is_contiguous() &&
                  hidden.size(1) % V == 0,
              "decoder_layer: hidden must be [rows, H] float32 or bfloat16, contiguous, H a multiple of ", V);
  TORCH_CHECK(keys.dim() == 4 && values.sizes() == keys.sizes(), "decoder_layer: keys and values [rows, kv_heads, columns, dim]");
  const int64_t rows = hidden.size(0), H = hidden.size(1), kv_heads = keys.size(1), dim = keys.size(3);
  TORCH_CHECK(0 <= first_row && first_row + rows <= keys.size(0) && 0 <= start && start <= write_at &&
                  write_at < keys.size(2), "decoder_layer: rows ", first_row, "+", rows, ", columns ", start, " to ",
              write_at, " are outside the store's ", keys.size(0), " x ", keys.size(2));
  TORCH_CHECK(keys.scalar_type() == dtype && values.scalar_type() == dtype && keys.stride(3) == 1 && values.stride(3) == 1,
              "decoder_layer: the store's dtype and head size must be the model's, each head's vector contiguous");
  for (const at::Tensor* norm : {&input_norm, &post_norm})
    TORCH_CHECK(norm->scalar_type() == dtype && norm->dim() == 1 && norm->size(0) == H && norm->is_contiguous(),
                "decoder_layer: the norms' weights must be [", H, "] in hidden's dtype");
  TORCH_CHECK(kv_heads > 0 && heads > 0 && heads % kv_heads == 0 && heads / kv_heads <= MAX_GROUP,
              "decoder_layer: ", heads, " heads over ", kv_heads, " key-value heads");
  TORCH_CHECK(dim % (2 * V) == 0 && dim <= MAX_DIM, "decoder_layer: head size ", dim, " is not a multiple of ", 2 * V,
              " up to ", MAX_DIM);
  const int64_t cols = write_at + 1 - start, turned_heads = heads + kv_heads, qkv_width = (heads + 2 * kv_heads) * dim;
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 3 && mask.size(0) == rows && mask.size(1) == 1 &&
                  mask.size(2) == cols && mask.is_contiguous(),
              "decoder_layer: mask must be [", rows, ", 1, ", cols, "] bool and contiguous");
  for (const at::Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->scalar_type() == dtype && t->dim() == 3 && t->size(0) == rows && t->size(1) == 1 && t->size(2) == dim &&
                    t->is_contiguous(), "decoder_layer: cos and sin must be [", rows, ", 1, ", dim, "] in hidden's dtype");
  TORCH_CHECK(check_projection(qkv, H, dtype) == qkv_width, "decoder_layer: qkv must give ", qkv_width, " features");
  TORCH_CHECK(check_projection(o, heads * dim, dtype) == H, "decoder_layer: o must give ", H, " features");
  const int64_t inner = check_projection(gate_up, H, dtype) / 2;
  TORCH_CHECK(inner % V == 0, "decoder_layer: gate_up's halves must be a multiple of ", V);
  TORCH_CHECK(check_projection(down, inner, dtype) == H, "decoder_layer: down must give ", H, " features");

  at::Tensor out = at::empty_like(hidden);
  // NOTE: one buffer holds every intermediate, [rows, width] each, side by side: normed (H, both norms), qkv
  // (qkv_width), turned (q and k heads, rotated), attended (heads dim), mid (H: the residual after attention),
  // gate_up (2 inner) and act (inner).
  at::Tensor scratch = at::empty({rows * (2 * H + qkv_width + (turned_heads + heads) * dim + 3 * inner)}, hidden.options());
  with_type(dtype, [&](auto type) {
    using T = decltype(type);
    const T* x = read<T>(hidden);
    T* normed = write<T>(scratch);
    T* qkv_out = normed + rows * H;              // [rows, heads + 2 kv_heads, dim]
    T* turned = qkv_out + rows * qkv_width;      // [rows, heads + kv_heads, dim]
    T* attended = turned + rows * turned_heads * dim;  // [rows, heads, dim]
    T* mid = attended + rows * heads * dim;      // [rows, H]
    T* gate_up_out = mid + rows * H;             // [rows, 2 inner]
    T* act = gate_up_out + rows * 2 * inner;     // [rows, inner]
    T* y = write<T>(out);
    norm_rows(x, read<T>(input_norm), rows, H, static_cast<float>(input_eps), normed);
    project(normed, rows, H, qkv, qkv_out);
    rotate_rows(qkv_out, read<T>(cos), read<T>(sin), rows, heads + 2 * kv_heads, turned_heads, dim, turned);
    // NOTE: each row's new key (turned heads [heads, heads + kv_heads)) and value (qkv heads [heads + kv_heads,
    // heads + 2 kv_heads)) land in its column write_at, and its query attends to columns [start, write_at] of its
    // own row: the window models/kv_cache.py's `WindowLayer.update` writes and returns.
    write_column(keys, first_row, write_at, turned + heads * dim, turned_heads * dim, rows);
    write_column(values, first_row, write_at, qkv_out + turned_heads * dim, qkv_width, rows);
    const int64_t query_stride = turned_heads * dim;  // the query heads of `turned`, as [rows, heads, 1, dim]
    attend(Attend<T>{turned, read<T>(keys) + first_row * keys.stride(0) + start * keys.stride(2),
                     read<T>(values) + first_row * values.stride(0) + start * values.stride(2), read<bool>(mask),
                     attended, rows, heads, 1, dim, kv_heads, cols, {query_stride, dim, query_stride},
                     {keys.stride(0), keys.stride(1), keys.stride(2)}, {values.stride(0), values.stride(1), values.stride(2)}},
           static_cast<float>(scaling));
    project(attended, rows, heads * dim, o, mid);
    add_rows(x, mid, rows * H, mid);
    norm_rows(mid, read<T>(post_norm), rows, H, static_cast<float>(post_eps), normed);
    project(normed, rows, H, gate_up, gate_up_out);
    silu_mul_rows(gate_up_out, rows, inner, act);
    project(act, rows, inner, down, y);
    add_rows(mid, y, rows * H, y);
  });
  return out;
}

// The index of a row's largest value as torch.argmax gives it: the first one on ties (-0 equals +0), and a NaN
// counts as the largest (the first NaN's index). Two passes over the row: its maximum, then where it first is.
int64_t row_argmax(const float* x, int64_t n) {
  const int64_t whole = n / V * V;
  Vec top = splat(-INFINITY);
  uint32_t nan = 0;
  for (int64_t i = 0; i < whole; i += V) {
    const Vec v = load(x + i);
    nan |= nan_lanes(v);
    top = max(top, v);
  }
  float best = -INFINITY;
  alignas(64) float lanes[V];
  store(lanes, top);
  for (int64_t j = 0; j < V; ++j) best = std::max(best, lanes[j]);
  for (int64_t i = whole; i < n; ++i) {
    if (std::isnan(x[i])) nan = 1;
    best = std::max(best, x[i]);
  }
  if (nan) {
    for (int64_t i = 0; i < n; ++i)
      if (std::isnan(x[i])) return i;
  }
  const Vec target = splat(best);
  for (int64_t i = 0; i < whole; i += V)
    if (const uint32_t found = equal_lanes(load(x + i), target)) return i + __builtin_ctz(found);
  for (int64_t i = whole; i < n; ++i)
    if (x[i] == best) return i;
  return 0;  // every value -inf: the first
}

at::Tensor argmax(const at::Tensor& x) {
  // x [rows, n] float32, contiguous -> [rows] int64
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) > 0 && x.is_contiguous(),
              "argmax: x must be [rows, n] float32 with n > 0, contiguous");
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor out = at::empty({rows}, x.options().dtype(at::kLong));
  const float* xs = read<float>(x);
  int64_t* index = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) index[r] = row_argmax(xs + r * n, n);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(tokenferry, m) {
  m.def("argmax(Tensor x) -> Tensor", &argmax);
  m.def("panel_linear(Tensor x, Tensor panels) -> Tensor", &panel_linear);
  m.def("panel_width() -> int", &panel_width);
  m.def("int8_linear(Tensor x, Tensor codes, Tensor scales) -> Tensor", &int8_linear);
  m.def("int4_linear(Tensor x, Tensor codes, Tensor scale_zeros) -> Tensor", &int4_linear);
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm);
  m.def("silu_mul(Tensor gate_up) -> Tensor", &silu_mul);
  m.def("rotary(Tensor x, Tensor cos, Tensor sin, int turned) -> Tensor", &rotary);
  m.def("attention(Tensor query, Tensor keys, Tensor values, Tensor mask, float scale) -> Tensor", &attention);
  m.def("decoder_layer(Tensor hidden, Tensor input_norm, float input_eps, Tensor post_norm, float post_eps, Tensor[] qkv, "
        "Tensor[] o, Tensor[] gate_up, Tensor[] down, Tensor(a!) keys, Tensor(b!) values, int first_row, int start, "
        "int write_at, Tensor mask, Tensor cos, Tensor sin, int heads, float scaling) -> Tensor", &decoder_layer);
}
