// Weight-only quantized linear layers for CPUs with AVX2 + FMA: y[M, N] = x[M, K] @ dequant(W)[N, K]^T.
//
// Two formats, both with groups ("blocks") of 32 consecutive weights along K, both lossless for the
// SmolLM2 GGUF (its layers are Q4_1, its embedding / tied lm_head Q8_0):
//   q4: w = d * q + m, q in 0..15. qweight uint8 [N, K/2]: byte j of a block holds element j in its low
//       nibble and element j + 16 in its high nibble (llama.cpp's Q4_1 order); scales, mins fp32 [N, K/32].
//   q8: w = d * q, q int8. qweight int8 [N, K]; scales fp32 [N, K/32].
//
// Decoding (M = 1) reads every weight once per token, so the kernel is bound by memory bandwidth: it has
// to turn bytes into floats faster than DRAM delivers them (~12 cycles per q4 block per core at 20 GB/s
// on two cores) and must read nothing but the packed weights and x. With M > 1 (batched decoding, short
// prefills) the same weights serve M rows of x, the work becomes compute-bound and what matters is how
// many FMAs are done per unpacked weight: each unpacked block stays in registers while it is multiplied
// with up to 8 rows of x.
//
// Why dequantize in registers (w = fma(q, d, m), then FMAs with x) rather than
// y += d * dot(q, x) + m * sum(x): the second form saves the 4 dequantizing FMAs per block at M = 1 but
// needs an extra FMA per block and row of x, and a precomputed sum(x). Measured on one Zen3 core with
// weights in cache, M = 1: 2.0 ns per block and row dequantizing, 2.15 ns with the dot form; at M = 8
// the dequantize-once form does fewer operations. One form for every M also keeps one rounding behaviour.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

// With torch's OpenMP build, at::parallel_for is a header template around `#pragma omp parallel`:
// compiled without -fopenmp it quietly runs on one thread.
#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#error "compile with -fopenmp, or at::parallel_for runs on one thread"
#endif

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;

// The two formats, each seen as a matrix of blocks. `block(n, b, w)` dequantizes block b of weight row n
// into four vectors: w[j] holds elements 8j..8j+7 of the block. For q4 one 8-byte load zero-extended to
// 8 int32 lanes gives two of them at once: the low nibbles are elements j..j+7, the high nibbles the
// elements 16 further on (llama.cpp's nibble order), so no byte shuffles are needed.
struct Q4Weights {
  const uint8_t* q;
  const float* d;
  const float* m;
  int64_t K;
  int64_t nb;  // blocks per row

  inline void block(int64_t n, int64_t b, __m256 w[4]) const {
    const uint8_t* bytes = q + n * (K / 2) + b * (kBlock / 2);
    const __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
    const __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + 8)));
    const __m256i low = _mm256_set1_epi32(0xF);
    const __m256 scale = _mm256_broadcast_ss(d + n * nb + b);
    const __m256 min = _mm256_broadcast_ss(m + n * nb + b);
    w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v0, low)), scale, min);
    w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v1, low)), scale, min);
    w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4)), scale, min);
    w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4)), scale, min);
  }
};

struct Q8Weights {
  const int8_t* q;
  const float* d;
  int64_t K;
  int64_t nb;

  inline void block(int64_t n, int64_t b, __m256 w[4]) const {
    const int8_t* bytes = q + n * K + b * kBlock;
    const __m256 scale = _mm256_broadcast_ss(d + n * nb + b);
    for (int j = 0; j < 4; ++j) {
      const __m128i q8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + 8 * j));
      w[j] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)), scale);
    }
  }
};

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// GCC does not always unroll the small constant-bound loops below by itself; when it does not, the
// accumulator arrays live on the stack and every block stores them back to memory.
#define UNROLL _Pragma("GCC unroll 8")

// y[r, n0 + c] = x[r, :] . w[n0 + c, :] for R rows of x and C weight rows.
//
// x comes packed by rows of blocks: xp[b * R * 32 + r * 32 + j] = x[r, b * 32 + j]. All loads of a block
// then come from one pointer at constant offsets; with R separate row pointers the integer registers ran
// out and the loop spent its issue slots reloading and advancing them (at M = 1 the layout is x itself).
//
// Each unpacked block (4 registers) serves all R rows before the next is unpacked, so unpacking costs
// 1/R of what it would per row. Accumulators hold 8 partial sums each, added across lanes only at the
// end. With few outputs (R * C <= 4) each gets a second accumulator so that consecutive FMAs do not
// wait on each other's 4-cycle latency.
//
// Not inlined: inlined into its caller with all its siblings, GCC allocated registers worse (M = 2 was
// 1.5x slower).
template <class W, int R, int C>
__attribute__((noinline)) void tile(const W& w, int64_t n0, int64_t b0, int64_t b1, const float* xp, float* y,
                                    int64_t ldy, bool accumulate) {
  constexpr bool kTwo = R * C <= 4;
  __m256 acc[R][C];
  __m256 acc2[kTwo ? R : 1][kTwo ? C : 1];
  UNROLL for (int r = 0; r < R; ++r) {
    UNROLL for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  }
  if constexpr (kTwo) {
    UNROLL for (int r = 0; r < R; ++r) {
      UNROLL for (int c = 0; c < C; ++c) acc2[r][c] = _mm256_setzero_ps();
    }
  }

  for (int64_t b = b0; b < b1; ++b) {
    const float* xb = xp + b * R * kBlock;
    UNROLL for (int c = 0; c < C; ++c) {
      __m256 wv[4];
      w.block(n0 + c, b, wv);
      UNROLL for (int r = 0; r < R; ++r) {
        const float* xr = xb + r * kBlock;
        if constexpr (kTwo) {
          acc[r][c] = _mm256_fmadd_ps(wv[0], _mm256_loadu_ps(xr), acc[r][c]);
          acc2[r][c] = _mm256_fmadd_ps(wv[1], _mm256_loadu_ps(xr + 8), acc2[r][c]);
          acc[r][c] = _mm256_fmadd_ps(wv[2], _mm256_loadu_ps(xr + 16), acc[r][c]);
          acc2[r][c] = _mm256_fmadd_ps(wv[3], _mm256_loadu_ps(xr + 24), acc2[r][c]);
        } else {
          UNROLL for (int j = 0; j < 4; ++j) {
            acc[r][c] = _mm256_fmadd_ps(wv[j], _mm256_loadu_ps(xr + 8 * j), acc[r][c]);
          }
        }
      }
    }
  }
  UNROLL for (int r = 0; r < R; ++r) {
    UNROLL for (int c = 0; c < C; ++c) {
      if constexpr (kTwo) acc[r][c] = _mm256_add_ps(acc[r][c], acc2[r][c]);
      float* out = y + r * ldy + n0 + c;
      *out = accumulate ? *out + hsum(acc[r][c]) : hsum(acc[r][c]);
    }
  }
}

// At M = 1 four weight rows share each x vector; the kernel waits on DRAM and any layout of the loop
// that avoids register spills does. At M > 1 one weight row meets up to kRows rows of x: 8 accumulators
// plus 4 unpacked vectors fit AVX2's 16 registers, and the 4 unpacking FMAs are spread over 32 useful ones.
constexpr int kColsDecode = 4;
constexpr int kRows = 8;
// At M > 1, K is walked in chunks so that a tile of x (its rows over one chunk, at most 24 KiB) stays
// in L1 while the weight rows pass: read from L2 instead, x capped the FMAs at about one per cycle
// (M = 8, K = 1536: 48 -> 78 GFLOP/s on one core).
constexpr int64_t kXTileBytes = 24 * 1024;
// ... and N in chunks whose weights (192 KiB for one K chunk) stay in L2 while the x tiles pass over them.
constexpr int64_t kChunkBytes = 192 * 1024;
// Threads split N. Below this many multiply-adds per thread the pool's fork/join (a few microseconds)
// costs more than it saves.
constexpr int64_t kMinMacsPerThread = 1 << 16;

// Weight row n against the `rows` (<= kRows) rows of x packed at xp, over blocks [b0, b1).
template <class W>
void column(const W& w, int64_t n, int64_t b0, int64_t b1, const float* xp, int64_t rows, float* y, int64_t N) {
  const bool acc = b0 > 0;
  switch (rows) {
    case 8: tile<W, 8, 1>(w, n, b0, b1, xp, y, N, acc); break;
    case 7: tile<W, 7, 1>(w, n, b0, b1, xp, y, N, acc); break;
    case 6: tile<W, 6, 1>(w, n, b0, b1, xp, y, N, acc); break;
    case 5: tile<W, 5, 1>(w, n, b0, b1, xp, y, N, acc); break;
    case 4: tile<W, 4, 1>(w, n, b0, b1, xp, y, N, acc); break;
    case 3: tile<W, 3, 1>(w, n, b0, b1, xp, y, N, acc); break;
    case 2: tile<W, 2, 1>(w, n, b0, b1, xp, y, N, acc); break;
    case 1: tile<W, 1, 1>(w, n, b0, b1, xp, y, N, acc); break;
    default: break;
  }
}
static_assert(kRows == 8, "column() dispatches on up to 8 rows");

template <class W>
void run(const W& w, const float* x, int64_t M, int64_t N, int64_t K, float* y, double bytes_per_weight) {
  const int64_t nb = K / kBlock;
  const int64_t grain = std::max<int64_t>(1, kMinMacsPerThread / (K * M));  // in weight rows

  if (M == 1) {
    at::parallel_for(0, N, std::max<int64_t>(grain, kColsDecode), [&](int64_t begin, int64_t end) {
      int64_t n = begin;
      for (; n + kColsDecode <= end; n += kColsDecode) tile<W, 1, kColsDecode>(w, n, 0, nb, x, y, N, false);
      for (; n < end; ++n) tile<W, 1, 1>(w, n, 0, nb, x, y, N, false);
    });
    return;
  }

  // Pack x tile by tile of kRows rows (the last tile may be smaller), blocks outer, rows inner.
  std::vector<float> packed(M * K);
  for (int64_t r0 = 0; r0 < M; r0 += kRows) {
    const int64_t rows = std::min<int64_t>(kRows, M - r0);
    float* tile_x = packed.data() + r0 * K;
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t r = 0; r < rows; ++r)
        std::copy_n(x + (r0 + r) * K + b * kBlock, kBlock, tile_x + (b * rows + r) * kBlock);
  }

  // K in equal chunks of at most max_blocks blocks.
  const int64_t max_blocks = kXTileBytes / (std::min<int64_t>(M, kRows) * kBlock * sizeof(float));
  const int64_t k_chunks = (nb + max_blocks - 1) / max_blocks;
  const int64_t chunk_blocks = (nb + k_chunks - 1) / k_chunks;
  const int64_t chunk_rows = std::max<int64_t>(
      1, static_cast<int64_t>(kChunkBytes / (bytes_per_weight * static_cast<double>(chunk_blocks * kBlock))));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n0 = begin; n0 < end; n0 += chunk_rows) {
      const int64_t n1 = std::min(end, n0 + chunk_rows);
      for (int64_t b0 = 0; b0 < nb; b0 += chunk_blocks) {
        const int64_t b1 = std::min(nb, b0 + chunk_blocks);
        // x tiles outer, weight rows inner: a tile of x stays in L1 while it meets every weight row of
        // the chunk, whose weights stay in L2 while the tiles of x pass over them.
        for (int64_t r0 = 0; r0 < M; r0 += kRows) {
          const int64_t rows = std::min<int64_t>(kRows, M - r0);
          for (int64_t n = n0; n < n1; ++n) column(w, n, b0, b1, packed.data() + r0 * K, rows, y + r0 * N, N);
        }
      }
    }
  });
}

// Checks shared by both ops, in the order a caller is most likely to get wrong: x, then which weight
// goes with it. `k_per_row` is how many weights one qweight element holds (2 for q4, 1 for q8).
// Returns x as a contiguous [M, K] matrix.
at::Tensor check_inputs(const char* op, const at::Tensor& x, const at::Tensor& qweight, at::ScalarType qtype,
                        int64_t k_per_row, const at::Tensor& scales) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, op, ": x must be a float32 CPU tensor, got ",
              x.scalar_type(), " on ", x.device());
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension");
  const int64_t K = x.size(-1);
  TORCH_CHECK(K % kBlock == 0, op, ": K (x.shape[-1]) = ", K, " must be a multiple of 32; pad the layer's inputs");
  const char* shape = k_per_row == 2 ? "[N, K/2]" : "[N, K]";
  TORCH_CHECK(qweight.scalar_type() == qtype && qweight.dim() == 2 && qweight.is_contiguous(), op,
              ": qweight must be contiguous ", qtype, " ", shape, ", got ", qweight.scalar_type(), " ",
              qweight.sizes());
  TORCH_CHECK(qweight.size(1) * k_per_row == K, op, ": qweight is ", qweight.sizes(), " and x has K = ", K,
              "; expected ", shape, " (is this the weight of another layer?)");
  const int64_t N = qweight.size(0);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.dim() == 2 &&
                  scales.size(0) == N && scales.size(1) == K / kBlock,
              op, ": scales must be contiguous float32 [N, K/32] = [", N, ", ", K / kBlock, "], got ",
              scales.scalar_type(), " ", scales.sizes());
  return x.reshape({-1, K}).contiguous();
}

at::Tensor output_like(const at::Tensor& x, int64_t N) {
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  return at::empty(sizes, x.options());
}

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const at::Tensor& mins) {
  const at::Tensor x2 = check_inputs("q4_linear", x, qweight, at::kByte, 2, scales);
  TORCH_CHECK(mins.scalar_type() == at::kFloat && mins.is_contiguous() && mins.sizes() == scales.sizes(),
              "q4_linear: mins must be contiguous float32 shaped like scales ", scales.sizes(), ", got ",
              mins.scalar_type(), " ", mins.sizes());
  const int64_t M = x2.size(0), K = x2.size(1), N = qweight.size(0);
  at::Tensor y = output_like(x, N);
  if (M == 0 || N == 0) return y;
  const Q4Weights w{qweight.data_ptr<uint8_t>(), scales.data_ptr<float>(), mins.data_ptr<float>(), K, K / kBlock};
  run(w, x2.data_ptr<float>(), M, N, K, y.data_ptr<float>(), 0.5 + 8.0 / kBlock);
  return y;
}

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  const at::Tensor x2 = check_inputs("q8_linear", x, qweight, at::kChar, 1, scales);
  const int64_t M = x2.size(0), K = x2.size(1), N = qweight.size(0);
  at::Tensor y = output_like(x, N);
  if (M == 0 || N == 0) return y;
  const Q8Weights w{qweight.data_ptr<int8_t>(), scales.data_ptr<float>(), K, K / kBlock};
  run(w, x2.data_ptr<float>(), M, N, K, y.data_ptr<float>(), 1.0 + 4.0 / kBlock);
  return y;
}

}  // namespace

// A fragment, not TORCH_LIBRARY: another extension of the project may add ops to the same namespace.
TORCH_LIBRARY_FRAGMENT(pipeline, m) {
  m.def("q4_linear(Tensor x, Tensor qweight, Tensor scales, Tensor mins) -> Tensor");
  m.def("q8_linear(Tensor x, Tensor qweight, Tensor scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(pipeline, CPU, m) {
  m.impl("q4_linear", &q4_linear);
  m.impl("q8_linear", &q8_linear);
}
