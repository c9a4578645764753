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
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

// With torch's OpenMP build, at::parallel_for is a header template around `#pragma omp parallel`:
// compiled without -fopenmp it quietly runs on one thread.
#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#error "compile with -fopenmp, or at::parallel_for runs on one thread"
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <cstdint>
#include <cstring>
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
  static constexpr int kBlockBytes = kBlock / 2;
  int64_t row_bytes() const { return K / 2; }

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
#if defined(__AVX512F__)
  // The same block as two 16-float vectors: the 16 bytes zero-extended at once, low nibbles elements 0..15,
  // high nibbles 16..31: half the instructions of the four 8-float vectors.
  inline void block512(int64_t n, int64_t b, __m512 w[2]) const {
    const uint8_t* bytes = q + n * (K / 2) + b * (kBlock / 2);
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
    const __m512 scale = _mm512_set1_ps(d[n * nb + b]), min = _mm512_set1_ps(m[n * nb + b]);
    w[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0xF))), scale, min);
    w[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), scale, min);
  }
#endif
};

struct Q8Weights {
  const int8_t* q;
  const float* d;
  int64_t K;
  int64_t nb;
  static constexpr int kBlockBytes = kBlock;
  int64_t row_bytes() const { return K; }

  inline void block(int64_t n, int64_t b, __m256 w[4]) const {
    const int8_t* bytes = q + n * K + b * kBlock;
    const __m256 scale = _mm256_broadcast_ss(d + n * nb + b);
    for (int j = 0; j < 4; ++j) {
      const __m128i q8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + 8 * j));
      w[j] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)), scale);
    }
  }
#if defined(__AVX512F__)
  inline void block512(int64_t n, int64_t b, __m512 w[2]) const {
    const int8_t* bytes = q + n * K + b * kBlock;
    const __m512 scale = _mm512_set1_ps(d[n * nb + b]);
    for (int j = 0; j < 2; ++j) {
      const __m128i q8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + 16 * j));
      w[j] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q8)), scale);
    }
  }
#endif
};

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Fetches the part of the C weight rows after n0..n0+C-1 that block b of them covers (C blocks' bytes), so
// that while one group of rows is read from memory the next is on its way: with only the hardware
// prefetcher a single-row product (M = 1) read q8 weights at 6.7 GB/s on one core of a Zen machine whose
// core reads 13.6 GB/s from DRAM, 14.2 GB/s with this. Prefetches never fault, so the last group's reach
// past the matrix is harmless.
template <class W, int C>
inline void prefetch_next_rows(const W& w, int64_t n0, int64_t b) {
  const char* next = reinterpret_cast<const char*>(w.q) + (n0 + C) * w.row_bytes() + b * W::kBlockBytes * C;
  for (int line = 0; line < W::kBlockBytes * C; line += 64) _mm_prefetch(next + line, _MM_HINT_T0);
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
    if constexpr (R == 1) prefetch_next_rows<W, C>(w, n0, b);  // one row of x: reading weights is the limit
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

#if defined(__AVX512F__)
// M = 1 on the AVX512 builds: y[n0 + c] = x . w[n0 + c, :] for C weight rows, each block unpacked into two
// 16-float vectors (block512) and met by x's two, two accumulators per row. A one-row product is limited by
// unpacking, not by DRAM (AVX2's four vectors per block read about 20 of 48 GB/s on the AVX512-BF16 EPYC).
template <class W, int C>
__attribute__((noinline)) void gemv_tile512(const W& w, int64_t n0, const float* x, float* y) {
  __m512 acc[C], acc2[C];
  UNROLL for (int c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps(), acc2[c] = _mm512_setzero_ps();
  for (int64_t b = 0; b < w.nb; ++b) {
    prefetch_next_rows<W, C>(w, n0, b);
    const __m512 x0 = _mm512_loadu_ps(x + b * kBlock), x1 = _mm512_loadu_ps(x + b * kBlock + 16);
    UNROLL for (int c = 0; c < C; ++c) {
      __m512 wv[2];
      w.block512(n0 + c, b, wv);
      acc[c] = _mm512_fmadd_ps(wv[0], x0, acc[c]);
      acc2[c] = _mm512_fmadd_ps(wv[1], x1, acc2[c]);
    }
  }
  UNROLL for (int c = 0; c < C; ++c) y[n0 + c] = _mm512_reduce_add_ps(_mm512_add_ps(acc[c], acc2[c]));
}
#endif

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

#if defined(__AVX512F__)
// `tile` for one weight row on the AVX512 builds: each block unpacked into two 16-float vectors (block512)
// serves the R rows of x, two accumulators a row (16 of the 32 registers at R = 8).
template <class W, int R>
__attribute__((noinline)) void tile512(const W& w, int64_t n0, int64_t b0, int64_t b1, const float* xp, float* y,
                                       int64_t ldy, bool accumulate) {
  __m512 acc[R], acc2[R];
  UNROLL for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps(), acc2[r] = _mm512_setzero_ps();
  for (int64_t b = b0; b < b1; ++b) {
    const float* xb = xp + b * R * kBlock;
    __m512 wv[2];
    w.block512(n0, b, wv);
    UNROLL for (int r = 0; r < R; ++r) {
      acc[r] = _mm512_fmadd_ps(wv[0], _mm512_loadu_ps(xb + r * kBlock), acc[r]);
      acc2[r] = _mm512_fmadd_ps(wv[1], _mm512_loadu_ps(xb + r * kBlock + 16), acc2[r]);
    }
  }
  UNROLL for (int r = 0; r < R; ++r) {
    float* out = y + r * ldy + n0;
    const float v = _mm512_reduce_add_ps(_mm512_add_ps(acc[r], acc2[r]));
    *out = accumulate ? *out + v : v;
  }
}
#define PIPELINE_TILE(W, R) tile512<W, R>
#else
#define PIPELINE_TILE(W, R) tile<W, R, 1>
#endif

// Weight row n against the `rows` (<= kRows) rows of x packed at xp, over blocks [b0, b1).
template <class W>
void column(const W& w, int64_t n, int64_t b0, int64_t b1, const float* xp, int64_t rows, float* y, int64_t N) {
  const bool acc = b0 > 0;
  switch (rows) {
    case 8: PIPELINE_TILE(W, 8)(w, n, b0, b1, xp, y, N, acc); break;
    case 7: PIPELINE_TILE(W, 7)(w, n, b0, b1, xp, y, N, acc); break;
    case 6: PIPELINE_TILE(W, 6)(w, n, b0, b1, xp, y, N, acc); break;
    case 5: PIPELINE_TILE(W, 5)(w, n, b0, b1, xp, y, N, acc); break;
    case 4: PIPELINE_TILE(W, 4)(w, n, b0, b1, xp, y, N, acc); break;
    case 3: PIPELINE_TILE(W, 3)(w, n, b0, b1, xp, y, N, acc); break;
    case 2: PIPELINE_TILE(W, 2)(w, n, b0, b1, xp, y, N, acc); break;
    case 1: PIPELINE_TILE(W, 1)(w, n, b0, b1, xp, y, N, acc); break;
    default: break;
  }
}
static_assert(kRows == 8, "column() dispatches on up to 8 rows");

// ------------------------------------------------------------------ M = 1 with int8 activations
//
// Dequantizing in fp32 costs about 10 cycles per block of 32 weights on one Zen core: two cores then
// read 13-14 GB/s of q4 weights where DRAM gives 20. llama.cpp's answer, taken here as an option
// (`int8_x`): quantize x once per call to int8 in blocks of 32 (scale max|x| / 127, like its Q8_0),
// then each weight block is one integer dot product of 32 bytes (maddubs + madd), about 5 cycles.
// The result differs from the fp32 path by x's rounding (relative 1/254 per block at most); the
// weights are read exactly as stored.

struct XQ8 {
  std::vector<int8_t> q;  // [K]
  std::vector<float> d;   // [K/32] scale per block
  std::vector<float> s;   // [K/32] d * sum(q): what a q4 block's min multiplies
};

XQ8 quantize_x(const float* x, int64_t K) {
  XQ8 out{std::vector<int8_t>(K), std::vector<float>(K / kBlock), std::vector<float>(K / kBlock)};
  for (int64_t b = 0; b < K / kBlock; ++b) {
    const float* xb = x + b * kBlock;
    float amax = 0.f;
    for (int j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
    int sum = 0;
    for (int j = 0; j < kBlock; ++j) {
      const int q = static_cast<int>(std::nearbyint(xb[j] * id));
      out.q[b * kBlock + j] = static_cast<int8_t>(q);
      sum += q;
    }
    out.d[b] = d;
    out.s[b] = d * static_cast<float>(sum);
  }
  return out;
}

// 16 bytes of a q4 block as its 32 values 0..15 in element order (low nibbles, then high nibbles).
inline __m256i q4_values(const uint8_t* bytes) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
  const __m128i low = _mm_set1_epi8(0xF);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), low), _mm_and_si128(v, low));
}

// Sums of products of 32 unsigned bytes and 32 signed bytes, as 8 int32 lanes turned float. With AVX512-VNNI
// one vpdpbusd does it; maddubs' int16 sums cannot saturate here (at most 2 * 15 * 127 for q4 and 2 * 127 * 127
// for q8), so both give the same integers.
inline __m256 dot32(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s));
#else
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

template <int C>
void rows_i8(const Q4Weights& w, int64_t n0, const XQ8& x, float* y) {
  __m256 acc[C];
  float mins[C];
  UNROLL for (int c = 0; c < C; ++c) acc[c] = _mm256_setzero_ps(), mins[c] = 0.f;
  for (int64_t b = 0; b < w.nb; ++b) {
    prefetch_next_rows<Q4Weights, C>(w, n0, b);
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q.data() + b * kBlock));
    UNROLL for (int c = 0; c < C; ++c) {
      const int64_t n = n0 + c, at = n * w.nb + b;
      const __m256 p = dot32(q4_values(w.q + n * (w.K / 2) + b * (kBlock / 2)), xv);
      acc[c] = _mm256_fmadd_ps(p, _mm256_set1_ps(w.d[at] * x.d[b]), acc[c]);
      mins[c] += w.m[at] * x.s[b];
    }
  }
  UNROLL for (int c = 0; c < C; ++c) y[n0 + c] = hsum(acc[c]) + mins[c];
}

template <int C>
void rows_i8(const Q8Weights& w, int64_t n0, const XQ8& x, float* y) {
  __m256 acc[C];
  UNROLL for (int c = 0; c < C; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t b = 0; b < w.nb; ++b) {
    prefetch_next_rows<Q8Weights, C>(w, n0, b);
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q.data() + b * kBlock));
    UNROLL for (int c = 0; c < C; ++c) {
      const int64_t n = n0 + c;
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.q + n * w.K + b * kBlock));
      // maddubs wants one unsigned operand: |w| and x with w's sign (-128 never occurs: q is in -127..127)
      const __m256 p = dot32(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
      acc[c] = _mm256_fmadd_ps(p, _mm256_set1_ps(w.d[n * w.nb + b] * x.d[b]), acc[c]);
    }
  }
  UNROLL for (int c = 0; c < C; ++c) y[n0 + c] = hsum(acc[c]);
}

template <class W>
void gemv_i8(const W& w, const float* x, int64_t N, int64_t K, float* y) {
  const XQ8 xq = quantize_x(x, K);
  const int64_t grain = std::max<int64_t>(kColsDecode, kMinMacsPerThread / K);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    int64_t n = begin;
    for (; n + kColsDecode <= end; n += kColsDecode) rows_i8<kColsDecode>(w, n, xq, y);
    for (; n < end; ++n) rows_i8<1>(w, n, xq, y);
  });
}

template <class W>
void run(const W& w, const float* x, int64_t M, int64_t N, int64_t K, float* y, double bytes_per_weight,
         bool int8_x = false) {
  if (M == 1 && int8_x) {
    gemv_i8(w, x, N, K, y);
    return;
  }
  const int64_t nb = K / kBlock;
  const int64_t grain = std::max<int64_t>(1, kMinMacsPerThread / (K * M));  // in weight rows

  if (M == 1) {
    at::parallel_for(0, N, std::max<int64_t>(grain, kColsDecode), [&](int64_t begin, int64_t end) {
      int64_t n = begin;
#if defined(__AVX512F__)
      for (; n + kColsDecode <= end; n += kColsDecode) gemv_tile512<W, kColsDecode>(w, n, x, y);
      for (; n < end; ++n) gemv_tile512<W, 1>(w, n, x, y);
#else
      for (; n + kColsDecode <= end; n += kColsDecode) tile<W, 1, kColsDecode>(w, n, 0, nb, x, y, N, false);
      for (; n < end; ++n) tile<W, 1, 1>(w, n, 0, nb, x, y, N, false);
#endif
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
                     const at::Tensor& mins, bool int8_x) {
  const at::Tensor x2 = check_inputs("q4_linear", x, qweight, at::kByte, 2, scales);
  TORCH_CHECK(mins.scalar_type() == at::kFloat && mins.is_contiguous() && mins.sizes() == scales.sizes(),
              "q4_linear: mins must be contiguous float32 shaped like scales ", scales.sizes(), ", got ",
              mins.scalar_type(), " ", mins.sizes());
  const int64_t M = x2.size(0), K = x2.size(1), N = qweight.size(0);
  at::Tensor y = output_like(x, N);
  if (M == 0 || N == 0) return y;
  const Q4Weights w{qweight.data_ptr<uint8_t>(), scales.data_ptr<float>(), mins.data_ptr<float>(), K, K / kBlock};
  run(w, x2.data_ptr<float>(), M, N, K, y.data_ptr<float>(), 0.5 + 8.0 / kBlock, int8_x);
  return y;
}

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, bool int8_x) {
  const at::Tensor x2 = check_inputs("q8_linear", x, qweight, at::kChar, 1, scales);
  const int64_t M = x2.size(0), K = x2.size(1), N = qweight.size(0);
  at::Tensor y = output_like(x, N);
  if (M == 0 || N == 0) return y;
  const Q8Weights w{qweight.data_ptr<int8_t>(), scales.data_ptr<float>(), K, K / kBlock};
  run(w, x2.data_ptr<float>(), M, N, K, y.data_ptr<float>(), 1.0 + 4.0 / kBlock, int8_x);
  return y;
}


// ------------------------------------------------------------------ many rows with int8 activations (AVX512)
//
// Above the kernel's row limit the engine's products went to bf16 GEMM (oneDNN): for a 16-row prefill that
// reads the weights in bf16 (212 MB for 30 layers, 4x the q4 bytes) and pays oneDNN's set-up per call. Here the
// q4 weights themselves meet activations quantized to int8 per 32 values (as `int8_x` does for one row,
// llama.cpp's Q8 activations): vpdpbusd does 64 multiply-adds of unsigned 4-bit weights and signed 8-bit
// activations per instruction, and the weights are read as stored. Measured, 30 layers' products on the
// AVX512-BF16 EPYC (2 threads): 16 rows 4.0 ms (oneDNN bf16 9.6), 32 rows 7.0 (13.9), 512 rows 90 (124); with
// two digits (`split`, below) 6.4, 11.7 and 167: faster than bf16 up to about 100 rows, slower above.
//
// The weights are re-laid for it once, at load ("tiles", kernels.q4_tiles): 16 output rows side by side, so
// that each 32-bit lane of a register is one output and the 16 products of a row of x come out of one
// register with no horizontal sums. Per tile of 16 outputs and block b (384 bytes): 4 x 64 bytes of nibbles,
// byte 4n + i of chunk j being byte 4j + i of output n's Q4_1 block (low nibble element 4j + i, high nibble
// element 16 + 4j + i), then the 16 scales and the 16 mins, fp32. Unpacked, chunk j's low nibbles are
// elements 4j..4j+3 of each output and its high nibbles elements 16 + 4j.., i.e. group g = j and g = j + 4
// of 4 consecutive elements: each meets the 4 activation bytes of that group, broadcast.
//
// y[r, n] = sum over blocks of d[n] * dx[r] * (q[n] . xq[r]) + m[n] * sum(x[r]): the mins meet the exact fp32
// sum of x's block (not its rounded values, as llama.cpp's Q8_1 does), so only x's rounding (at most 1/254 of
// the block's largest value with one digit, 1/32512 with two) separates this from the fp32 product.
#if defined(__AVX512F__) && defined(__AVX512BW__)
constexpr int64_t kTileOut = 16;
constexpr int64_t kTileBlockBytes = 256 + 2 * 4 * kTileOut;
constexpr int kRowsI8 = 8;

// x quantized per block of 32: values q, scale d and exact sum s per (row, block), and with `split` the
// remainder r = round((x - d q) * 128 / d) in a second byte: x = d (q + r / 128) to 1/256 of d, 15 bits against the
// block's largest value instead of 8 (error measured along real prompts: KLD 6.5e-3 against the fp32 products with
// q alone, qkv's and gate_up's normed inputs most, whose outlier channels set their blocks' scales)
struct RowsQ8 {
  std::vector<int8_t> q, r;
  std::vector<float> d, s;
};

RowsQ8 quantize_rows(const float* x, int64_t M, int64_t K, bool split) {
  const int64_t nb = K / kBlock;
  RowsQ8 out{std::vector<int8_t>(M * K), std::vector<int8_t>(split ? M * K : 0), std::vector<float>(M * nb),
             std::vector<float>(M * nb)};
  at::parallel_for(0, M, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t at = r * K + b * kBlock;
        const float* xb = x + at;
        const __m512 a = _mm512_loadu_ps(xb), c = _mm512_loadu_ps(xb + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(c)));
        const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
        const __m512 inv = _mm512_set1_ps(id);
        // cvtps_epi32 rounds to nearest even, as std::nearbyint does in the one-row path
        const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(c, inv));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out.q.data() + at), _mm512_cvtsepi32_epi8(q0));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out.q.data() + at + 16), _mm512_cvtsepi32_epi8(q1));
        if (split) {  // |x - d q| <= d / 2: the remainder is within +-64
          const __m512 dv = _mm512_set1_ps(d), fine = _mm512_set1_ps(128.f * id);
          const __m512 r0 = _mm512_mul_ps(_mm512_fnmadd_ps(_mm512_cvtepi32_ps(q0), dv, a), fine);
          const __m512 r1 = _mm512_mul_ps(_mm512_fnmadd_ps(_mm512_cvtepi32_ps(q1), dv, c), fine);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(out.r.data() + at), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(r0)));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(out.r.data() + at + 16),
                           _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(r1)));
        }
        out.d[r * nb + b] = split ? d / 128.f : d;
        out.s[r * nb + b] = _mm512_reduce_add_ps(_mm512_add_ps(a, c));
      }
    }
  });
  return out;
}

// 16 lanes of sums of 4 products of unsigned and signed bytes, added to s: one vpdpbusd with VNNI, maddubs +
// madd without (their int16 sums cannot saturate: at most 2 * 15 * 127)
inline __m512i dot4(__m512i s, __m512i u, __m512i v) {
#if defined(__AVX512VNNI__)
  return _mm512_dpbusd_epi32(s, u, v);
#else
  return _mm512_add_epi32(s, _mm512_madd_epi16(_mm512_maddubs_epi16(u, v), _mm512_set1_epi16(1)));
#endif
}

// Outputs n0..n0+15 (the tile at `tile`) for R rows of x starting at row r0, over every block.
template <int R, bool kSplit>
__attribute__((noinline)) void tile_i8(const uint8_t* tile, int64_t nb, const RowsQ8& x, int64_t r0, int64_t K,
                                       float* y, int64_t ldy) {
  __m512 acc[R];
  UNROLL for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0xF);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = tile + b * kTileBlockBytes;
    // 8 blocks ahead (3 KB, about a DRAM latency at a few rows of x): for a few rows the weights stream from memory
    for (int line = 0; line < kTileBlockBytes; line += 64) _mm_prefetch(reinterpret_cast<const char*>(blk) + 8 * kTileBlockBytes + line, _MM_HINT_T0);
    __m512i w[8];
    UNROLL for (int j = 0; j < 4; ++j) {
      const __m512i p = _mm512_loadu_si512(blk + 64 * j);
      w[j] = _mm512_and_si512(p, low);
      w[j + 4] = _mm512_and_si512(_mm512_srli_epi16(p, 4), low);
    }
    __m512i s[R];
    UNROLL for (int r = 0; r < R; ++r) s[r] = _mm512_setzero_si512();
    UNROLL for (int g = 0; g < 8; ++g) {
      UNROLL for (int r = 0; r < R; ++r) {
        int32_t four;
        std::memcpy(&four, x.q.data() + (r0 + r) * K + b * kBlock + 4 * g, 4);
        s[r] = dot4(s[r], w[g], _mm512_set1_epi32(four));
      }
    }
    if constexpr (kSplit) {  // 128 q . w + r . w: one integer sum (at most 2^7 * 32 * 15 * 127 + 32 * 15 * 64)
      UNROLL for (int r = 0; r < R; ++r) s[r] = _mm512_slli_epi32(s[r], 7);
      UNROLL for (int g = 0; g < 8; ++g) {
        UNROLL for (int r = 0; r < R; ++r) {
          int32_t four;
          std::memcpy(&four, x.r.data() + (r0 + r) * K + b * kBlock + 4 * g, 4);
          s[r] = dot4(s[r], w[g], _mm512_set1_epi32(four));
        }
      }
    }
    const __m512 d = _mm512_loadu_ps(reinterpret_cast<const float*>(blk + 256));
    const __m512 m = _mm512_loadu_ps(reinterpret_cast<const float*>(blk + 256 + 4 * kTileOut));
    UNROLL for (int r = 0; r < R; ++r) {
      const int64_t at = (r0 + r) * nb + b;
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[r]), _mm512_mul_ps(d, _mm512_set1_ps(x.d[at])), acc[r]);
      acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(x.s[at]), acc[r]);
    }
  }
  UNROLL for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + (r0 + r) * ldy, acc[r]);
}

template <bool kSplit>
void rows_tile_i8(const uint8_t* tile, int64_t nb, const RowsQ8& x, int64_t r0, int64_t rows, int64_t K, float* y,
                  int64_t ldy) {
  switch (rows) {
    case 8: tile_i8<8, kSplit>(tile, nb, x, r0, K, y, ldy); break;
    case 7: tile_i8<7, kSplit>(tile, nb, x, r0, K, y, ldy); break;
    case 6: tile_i8<6, kSplit>(tile, nb, x, r0, K, y, ldy); break;
    case 5: tile_i8<5, kSplit>(tile, nb, x, r0, K, y, ldy); break;
    case 4: tile_i8<4, kSplit>(tile, nb, x, r0, K, y, ldy); break;
    case 3: tile_i8<3, kSplit>(tile, nb, x, r0, K, y, ldy); break;
    case 2: tile_i8<2, kSplit>(tile, nb, x, r0, K, y, ldy); break;
    case 1: tile_i8<1, kSplit>(tile, nb, x, r0, K, y, ldy); break;
    default: break;
  }
}
static_assert(kRowsI8 == 8, "rows_tile_i8() dispatches on up to 8 rows");

// y [M, N] = x [M, K] @ W.T with W as tiles [N/16, K/32, 384]. Threads split the tiles of outputs; each tile's
// weights (at most 18 KiB for K = 1536) stay in L1 while every row of x passes them.
void gemm_i8(const uint8_t* tiles, const float* x, int64_t M, int64_t N, int64_t K, float* y, bool split) {
  const int64_t nb = K / kBlock, count = N / kTileOut;
  const RowsQ8 xq = quantize_rows(x, M, K, split);
  const int64_t grain = std::max<int64_t>(1, kMinMacsPerThread / (K * M * kTileOut));
  at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t r0 = 0; r0 < M; r0 += kRowsI8) {
        const int64_t rows = std::min<int64_t>(kRowsI8, M - r0);
        const uint8_t* tile = tiles + t * nb * kTileBlockBytes;
        if (split) rows_tile_i8<true>(tile, nb, xq, r0, rows, K, y + t * kTileOut, N);
        else rows_tile_i8<false>(tile, nb, xq, r0, rows, K, y + t * kTileOut, N);
      }
    }
  });
}
#endif

bool has_gemm_i8() {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  return true;
#else
  return false;
#endif
}

void check_tiles(const char* op, const at::Tensor& tiles, int64_t K) {
  TORCH_CHECK(has_gemm_i8(), op, ": the int8 products of many rows need an AVX512 build of the kernel");
  TORCH_CHECK(tiles.scalar_type() == at::kByte && tiles.is_contiguous() && tiles.dim() == 3 &&
                  tiles.size(2) == 256 + 2 * 4 * 16 && tiles.size(1) * kBlock == K,
              op, ": tiles must be contiguous uint8 [N/16, K/32, 384] (q4_tiles) for K = ", K, ", got ",
              tiles.scalar_type(), " ", tiles.sizes());
}

// x [..., K] fp32 @ W.T for W as q4 tiles (q4_tiles), x quantized to int8 per 32 values.
at::Tensor q4_gemm_i8(const at::Tensor& x, const at::Tensor& tiles, bool split) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() >= 1,
              "q4_gemm_i8: x must be a float32 CPU tensor");
  const int64_t K = x.size(-1);
  TORCH_CHECK(K % kBlock == 0, "q4_gemm_i8: K = ", K, " must be a multiple of 32");
  check_tiles("q4_gemm_i8", tiles, K);
  const at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0), N = tiles.size(0) * 16;
  at::Tensor y = output_like(x, N);
#if defined(__AVX512F__) && defined(__AVX512BW__)
  if (M > 0 && N > 0) gemm_i8(tiles.data_ptr<uint8_t>(), x2.data_ptr<float>(), M, N, K, y.data_ptr<float>(), split);
#endif
  return y;
}


// The packed weights back in fp32 [N, K], as the kernels themselves unpack them (block() of each format):
// what the engine's fp32 GEMM path multiplies, made in milliseconds at load instead of seconds of torch ops.
template <typename W>
void unpack_rows(const W& w, int64_t N, int64_t K, float* out, const int64_t* rows = nullptr) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    __m256 v[4];
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t b = 0; b < K / kBlock; ++b) {
        w.block(rows ? rows[n] : n, b, v);
        for (int j = 0; j < 4; ++j) _mm256_storeu_ps(out + n * K + b * kBlock + 8 * j, v[j]);
      }
    }
  });
}

// The weight rows `rows` names (all, in order, when it is not given), checked against the matrix's N rows:
// a constrained step's allowed tokens (Linear.rows), gathered while they are unpacked, with no copies of the
// packed rows first (three index ops before: 15.5 -> 7.6 us a call for 8 lm_head rows, AMX Xeon).
at::Tensor picked_rows(const std::optional<at::Tensor>& rows, int64_t N, const char* op) {
  if (!rows.has_value()) return at::Tensor();
  const at::Tensor ids = rows->to(at::kLong).contiguous();
  TORCH_CHECK(ids.dim() == 1, op, ": rows must be one-dimensional, got ", ids.sizes());
  const int64_t* p = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < ids.numel(); ++i)
    TORCH_CHECK(p[i] >= 0 && p[i] < N, op, ": row ", p[i], " is outside the matrix's ", N, " rows");
  return ids;
}

at::Tensor q4_dequantize(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& mins,
                         const std::optional<at::Tensor>& rows) {
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 2 && qweight.is_contiguous() &&
                  scales.scalar_type() == at::kFloat && scales.is_contiguous() && mins.sizes() == scales.sizes() &&
                  mins.scalar_type() == at::kFloat && mins.is_contiguous() && scales.size(0) == qweight.size(0) &&
                  scales.size(1) * kBlock == 2 * qweight.size(1),
              "q4_dequantize: expected uint8 [N, K/2] with float32 scales and mins [N, K/32]");
  const int64_t N = qweight.size(0), K = 2 * qweight.size(1);
  const at::Tensor ids = picked_rows(rows, N, "q4_dequantize");
  const int64_t count = ids.defined() ? ids.numel() : N;
  at::Tensor out = at::empty({count, K}, scales.options());
  const Q4Weights w{qweight.data_ptr<uint8_t>(), scales.data_ptr<float>(), mins.data_ptr<float>(), K, K / kBlock};
  unpack_rows(w, count, K, out.data_ptr<float>(), ids.defined() ? ids.data_ptr<int64_t>() : nullptr);
  return out;
}

at::Tensor q8_dequantize(const at::Tensor& qweight, const at::Tensor& scales, const std::optional<at::Tensor>& rows) {
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 2 && qweight.is_contiguous() &&
                  scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.size(0) == qweight.size(0) &&
                  scales.size(1) * kBlock == qweight.size(1),
              "q8_dequantize: expected int8 [N, K] with float32 scales [N, K/32]");
  const int64_t N = qweight.size(0), K = qweight.size(1);
  const at::Tensor ids = picked_rows(rows, N, "q8_dequantize");
  const int64_t count = ids.defined() ? ids.numel() : N;
  at::Tensor out = at::empty({count, K}, scales.options());
  const Q8Weights w{qweight.data_ptr<int8_t>(), scales.data_ptr<float>(), K, K / kBlock};
  unpack_rows(w, count, K, out.data_ptr<float>(), ids.defined() ? ids.data_ptr<int64_t>() : nullptr);
  return out;
}

// ------------------------------------------------------------------ one decoder layer, fused

// The engine's decode step in eager PyTorch spends more time between operators (about 20 of them per
// layer: norms, the rotary multiply, cache writes, attention's matmuls and softmax, residual adds, each
// dispatched from Python and most forking the thread pool) than in the weight kernels. For the rows of a
// decoding step or a short prefill this runs one whole Llama layer in one call instead.

// y = x @ W.T through oneDNN, W packed once in its blocked layout (torch.ops.mkldnn._reorder_linear_weight,
// as inductor's frozen bf16 linears are): a plain [K, N] bf16 matrix is re-packed inside every at::mm call,
// which for a step of 8-32 rows cost as much as the product (measured: 30 layers at 32 rows, 21 vs 13 ms).
at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& packed) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  std::vector<c10::IValue> stack{x, packed, c10::IValue(), c10::IValue(std::string("none")),
                                 c10::IValue(c10::List<std::optional<at::Scalar>>()), c10::IValue()};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// A bf16 GEMM's output: rows of N in parts of `per` consecutive rows (one tensor each)
struct Bf16Rows {
  std::vector<at::Tensor> parts;
  std::vector<const uint16_t*> data;
  int64_t per = 1, N = 0;
  const uint16_t* row(int64_t r) const { return data[r / per] + (r % per) * N; }
  explicit operator bool() const { return !data.empty(); }
};

// Rows from which a bf16 GEMM on oneDNN-packed weights runs as one product per thread, each on that thread
// alone, rather than one product over all threads: oneDNN barely scales a 522-row product to two threads for
// some of SmolLM2's shapes (K 1536, N 576: 0.90 ms on two threads, 0.79 on one; K 576, N 576: 0.33 and 0.38 ms;
// AMX Xeon, bf16). Inside a parallel region oneDNN runs on the calling thread.
constexpr int64_t kSplitRows = 128;

// One weight matrix: packed q4 (uint8 qweight, scales, mins) or q8 (int8 qweight, scales); for more rows than
// `gemm_above` (a prefill, a batched step) the GEMM's copy: fp32 [K, N], bf16 [K, N] or packed for oneDNN; and for
// q4 the same weights as tiles for int8 products (uint8 [N/16, K/32, 384], gemm_i8; empty when unused), which take
// the rows above `gemm_above` up to `tile_rows`.
struct Packed {
  at::Tensor q, d, m, wt, tiles;
  int64_t N = 0, K = 0, gemm_above = 0, tile_rows = 0;
  bool split = true;

  // whether M rows go to the bf16 GEMM (oneDNN-packed or plain bf16 weights): its operands are then bf16 rows,
  // which the layer's row loops write and read themselves (gemm_bf16) instead of a conversion pass each way
  bool bf16_gemm(int64_t M) const {
    return M > gemm_above && !(M <= tile_rows && tiles.defined() && tiles.numel()) &&
           wt.scalar_type() == at::kBFloat16;
  }

  // the bf16 GEMM of M bf16 rows [M, K]: bf16 rows of N (see Bf16Rows)
  Bf16Rows gemm_bf16(const uint16_t* x, int64_t M) const {
    const int64_t threads = at::get_num_threads();
    Bf16Rows y;
    y.per = M >= kSplitRows && threads > 1 && wt.is_mkldnn() ? (M + threads - 1) / threads : M;
    const int64_t parts = (M + y.per - 1) / y.per;
    y.parts.resize(parts);
    y.data.resize(parts);
    y.N = N;
    const auto part = [&](int64_t p) {
      const int64_t rows = std::min(y.per, M - p * y.per);
      const at::Tensor in = at::from_blob(const_cast<uint16_t*>(x + p * y.per * K), {rows, K}, at::kBFloat16);
      at::Tensor out = wt.is_mkldnn() ? onednn_linear(in, wt) : at::mm(in, wt);
      TORCH_CHECK(out.scalar_type() == at::kBFloat16 && out.is_contiguous() && out.sizes() == at::IntArrayRef({rows, N}),
                  "decoder_layer: the bf16 GEMM gave ", out.scalar_type(), " ", out.sizes(), ", not contiguous bf16 [",
                  rows, ", ", N, "]");
      y.data[p] = reinterpret_cast<const uint16_t*>(out.data_ptr<at::BFloat16>());
      y.parts[p] = std::move(out);
    };
    if (parts == 1)
      part(0);
    else  // one part a thread, oneDNN on one thread inside (see kSplitRows)
      at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) part(p);
      });
    return y;
  }

  // The product of M rows as the layer runs it: the bf16 GEMM's from its bf16 rows xb (returned), else the others'
  // from the fp32 rows x into y (an empty Bf16Rows returned)
  Bf16Rows product(const float* x, const uint16_t* xb, int64_t M, float* y, bool int8_x) const {
    if (bf16_gemm(M)) return gemm_bf16(xb, M);
    apply(x, M, y, int8_x);
    return {};
  }

  void apply(const float* x, int64_t M, float* y, bool int8_x) const {
    if (M > gemm_above && M <= tile_rows && tiles.defined() && tiles.numel()) {  // q8 matrices have no tiles
#if defined(__AVX512F__) && defined(__AVX512BW__)
      gemm_i8(tiles.data_ptr<uint8_t>(), x, M, N, K, y, split);  // q4 tiles, int8 activations (calibrated)
#endif
    } else if (M > gemm_above) {  // fp32 GEMM; bf16 weights take gemm_bf16 (bf16_gemm says when)
      TORCH_CHECK(wt.scalar_type() == at::kFloat, "decoder_layer: bf16 GEMM weights take gemm_bf16, not apply");
      at::Tensor out = at::from_blob(y, {M, N}, at::kFloat);
      at::mm_out(out, at::from_blob(const_cast<float*>(x), {M, K}, at::kFloat), wt);
    } else if (m.defined()) {
      const Q4Weights w{q.data_ptr<uint8_t>(), d.data_ptr<float>(), m.data_ptr<float>(), K, K / kBlock};
      run(w, x, M, N, K, y, 0.5 + 8.0 / kBlock, int8_x);
    } else {
      const Q8Weights w{q.data_ptr<int8_t>(), d.data_ptr<float>(), K, K / kBlock};
      run(w, x, M, N, K, y, 1.0 + 4.0 / kBlock, int8_x);
    }
  }
};

// Takes the next matrix from `weights` (q4: qweight, scales, mins, GEMM weight, tiles; q8: qweight, scales, GEMM
// weight), checked like the ops' inputs.
Packed next_packed(const std::vector<at::Tensor>& weights, size_t& i, int64_t K, int64_t gemm_above,
                   int64_t tile_rows, bool split, const char* name) {
  TORCH_CHECK(i + 3 <= weights.size(), "decoder_layer: weights end before ", name);
  Packed p;
  p.q = weights[i++];
  p.d = weights[i++];
  const bool q4 = p.q.scalar_type() == at::kByte;
  if (q4) {
    TORCH_CHECK(i < weights.size(), "decoder_layer: ", name, " is q4 and needs mins");
    p.m = weights[i++];
  }
  const at::Tensor x = at::empty({1, K}, at::kFloat);
  check_inputs(name, x, p.q, q4 ? at::kByte : at::kChar, q4 ? 2 : 1, p.d);
  if (q4)
    TORCH_CHECK(p.m.scalar_type() == at::kFloat && p.m.is_contiguous() && p.m.sizes() == p.d.sizes(), name,
                ": mins must be contiguous float32 shaped like scales");
  p.N = p.q.size(0);
  p.K = K;
  TORCH_CHECK(i < weights.size(), "decoder_layer: ", name, " needs its fp32 weight [K, N] after the packed one");
  p.wt = weights[i++];
  if (p.wt.is_mkldnn()) {
    TORCH_CHECK(p.wt.scalar_type() == at::kBFloat16 && p.wt.dim() == 2 && p.wt.size(0) == p.N && p.wt.size(1) == K,
                name, ": a oneDNN-packed GEMM weight must be bfloat16 [N, K] = [", p.N, ", ", K, "], got ",
                p.wt.scalar_type(), " ", p.wt.sizes());
  } else {
    TORCH_CHECK((p.wt.scalar_type() == at::kFloat || p.wt.scalar_type() == at::kBFloat16) && p.wt.is_contiguous() &&
                    p.wt.dim() == 2 && p.wt.size(0) == K && p.wt.size(1) == p.N,
                name, ": the GEMM weight must be contiguous float32 or bfloat16 [K, N] = [", K, ", ", p.N, "], got ",
                p.wt.scalar_type(), " ", p.wt.sizes());
  }
  if (q4) {
    TORCH_CHECK(i < weights.size(), "decoder_layer: ", name, " is q4 and needs its int8 tiles (empty: none)");
    p.tiles = weights[i++];
    if (p.tiles.numel()) {
      check_tiles(name, p.tiles, K);
      TORCH_CHECK(p.tiles.size(0) * 16 == p.N, name, ": int8 tiles of ", p.tiles.size(0) * 16, " outputs for a matrix of ",
                  p.N, " (q4_tiles of another layer?)");
    }
  }
  p.tile_rows = tile_rows;
  p.split = split;
  p.gemm_above = gemm_above;
  return p;
}

// rows per thread below which row-wise loops (norms, rotary, SiLU, residual adds) stay on one thread
constexpr int64_t kRowGrain = 16;

// x's sum of squares in lanes: a scalar sum (not vectorized, its order being fixed) was a chain of H dependent
// adds, 0.9 us a row of 576, and the norms 7% of a 522-row prefill (AMX Xeon)
float sum_of_squares(const float* x, int64_t n) {
  int64_t i = 0;
  float ss = 0.f;
#if defined(__AVX512F__)
  __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
  for (; i + 32 <= n; i += 32) {
    const __m512 u = _mm512_loadu_ps(x + i), v = _mm512_loadu_ps(x + i + 16);
    a = _mm512_fmadd_ps(u, u, a);
    b = _mm512_fmadd_ps(v, v, b);
  }
  ss = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
#else
  __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps(), c = _mm256_setzero_ps(), d = _mm256_setzero_ps();
  for (; i + 32 <= n; i += 32) {
    const __m256 u = _mm256_loadu_ps(x + i), v = _mm256_loadu_ps(x + i + 8);
    const __m256 s = _mm256_loadu_ps(x + i + 16), t = _mm256_loadu_ps(x + i + 24);
    a = _mm256_fmadd_ps(u, u, a);
    b = _mm256_fmadd_ps(v, v, b);
    c = _mm256_fmadd_ps(s, s, c);
    d = _mm256_fmadd_ps(t, t, d);
  }
  ss = hsum(_mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, d)));
#endif
  for (; i < n; ++i) ss += x[i] * x[i];
  return ss;
}

void rms_norm_rows(const float* x, const float* w, int64_t M, int64_t H, double eps, float* y) {
  for (int64_t r = 0; r < M; ++r) {
    const float* xr = x + r * H;
    const float ss = sum_of_squares(xr, H);
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(H) + static_cast<float>(eps));
    for (int64_t i = 0; i < H; ++i) y[r * H + i] = xr[i] * inv * w[i];
  }
}

// Rotary embedding of `count` heads of D dimensions in `row`: each (even, odd) pair (a, b) becomes
// (a c - b s, a s + b c) for the pair's (cos, sin) in cs ([D / 2, 2]). Products rounded, then added, as the scalar
// loop this replaced (one row of a 522-row prefill took 1.6 us a thread there, a modulo per pair): the same bits.
void rotate_heads(float* row, int64_t count, const float* cs, int64_t D) {
  for (int64_t h = 0; h < count; ++h) {
    float* v = row + h * D;
    int64_t j = 0;
#if defined(__AVX512F__)
    for (; j + 16 <= D; j += 16) {
      const __m512 x = _mm512_loadu_ps(v + j), t = _mm512_loadu_ps(cs + j);
      const __m512 p = _mm512_mul_ps(x, _mm512_moveldup_ps(t));                         // a c, b c
      const __m512 q = _mm512_mul_ps(_mm512_permute_ps(x, 0xB1), _mm512_movehdup_ps(t));  // b s, a s
      _mm512_storeu_ps(v + j, _mm512_mask_sub_ps(_mm512_add_ps(p, q), 0x5555, p, q));
    }
#endif
    for (; j + 8 <= D; j += 8) {
      const __m256 x = _mm256_loadu_ps(v + j), t = _mm256_loadu_ps(cs + j);
      const __m256 p = _mm256_mul_ps(x, _mm256_moveldup_ps(t));
      const __m256 q = _mm256_mul_ps(_mm256_permute_ps(x, 0xB1), _mm256_movehdup_ps(t));
      _mm256_storeu_ps(v + j, _mm256_addsub_ps(p, q));
    }
    for (; j < D; j += 2) {
      const float c = cs[j], s = cs[j + 1], a = v[j], b = v[j + 1];
      v[j] = a * c - b * s;
      v[j + 1] = a * s + b * c;
    }
  }
}

// Cephes' expf constants, shared by exp8 and exp16: the clamp, log2(e), ln 2 split in two, and the degree-6
// polynomial's coefficients from the highest power down
constexpr float kExpHi = 88.3762626647949f, kExpLo = -87.3365478515625f, kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

// exp of 8 floats (Cephes' expf: 2^n * a degree-6 polynomial of the remainder; within 2 ulp of expf),
// for the softmax and SiLU: scalar std::exp made those a tenth of a prefill's time.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(kExpHi)), _mm256_set1_ps(kExpLo));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), x);
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
  UNROLL for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(kExpPoly[i]));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// Sums of four vectors' lanes: {sum(a), sum(b), sum(c), sum(d)}.
inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

// The pieces of attention for one query head. Written so that no FMA waits on the one before it: four
// keys' dot products at a time, and the weighted sum of values accumulates in one register per 8
// dimensions (a single chain of dependent FMAs ran at a quarter of the speed).

// s[j] = q . key j * scale for keys j in [begin, end), key j at keys + j * D.
void dot_keys(const float* q, const float* keys, int64_t begin, int64_t end, int64_t D, float scale, float* s) {
  const __m128 scale4 = _mm_set1_ps(scale);
  int64_t j = begin;
  for (; j + 4 <= end; j += 4) {
    const float* k = keys + j * D;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = 0; i < D; i += 8) {
      const __m256 qv = _mm256_loadu_ps(q + i);
      a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + i), a0);
      a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + D + i), a1);
      a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 2 * D + i), a2);
      a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 3 * D + i), a3);
    }
    _mm_storeu_ps(s + j, _mm_mul_ps(hsum4(a0, a1, a2, a3), scale4));
  }
  for (; j < end; ++j) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < D; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(keys + j * D + i), acc);
    s[j] = hsum(acc) * scale;
  }
}

#if defined(__AVX512F__)
// exp8's polynomial 16 lanes wide (the same value in every lane as exp8 gives)
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(kExpHi)), _mm512_set1_ps(kExpLo));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), x);
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  UNROLL for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(kExpPoly[i]));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}
#endif

// The largest of s[0..n) and top, vectorized (a scalar loop here was a tenth of a 32-row step's attention).
float max_of(const float* s, int64_t n, float top) {
  int64_t j = 0;
  __m256 m8 = _mm256_set1_ps(top);
  for (; j + 8 <= n; j += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(s + j));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
  top = _mm_cvtss_f32(m4);
  for (; j < n; ++j) top = std::max(top, s[j]);
  return top;
}

// s[j] = exp(s[j] - top) in place for j in [0, n); returns their sum.
float exp_in_place(float* s, int64_t n, float top) {
  const __m256 top8 = _mm256_set1_ps(top);
  __m256 sum8 = _mm256_setzero_ps();
  int64_t j = 0;
#if defined(__AVX512F__)
  const __m512 top16 = _mm512_set1_ps(top);
  __m512 sum16 = _mm512_setzero_ps();
  for (; j + 16 <= n; j += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), top16));
    _mm512_storeu_ps(s + j, e);
    sum16 = _mm512_add_ps(sum16, e);
  }
  sum8 = _mm256_add_ps(_mm512_castps512_ps256(sum16), _mm512_extractf32x8_ps(sum16, 1));
#endif
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), top8));
    _mm256_storeu_ps(s + j, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  float total = hsum(sum8);
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - top);
    total += s[j];
  }
  return total;
}

// out = (out if `add` else 0) + scale * sum of p[j] * value j over [begin, end), value j at values + j * D.
void weigh_values(const float* p, const float* values, int64_t begin, int64_t end, int64_t D, float scale,
                  bool add, float* out) {
  const __m256 scale8 = _mm256_set1_ps(scale);
  for (int64_t i0 = 0; i0 < D; i0 += 64) {
    const int64_t chunks = std::min<int64_t>(8, (D - i0) / 8);
    __m256 acc[8];
    for (int c = 0; c < 8; ++c) acc[c] = _mm256_setzero_ps();
    for (int64_t j = begin; j < end; ++j) {
      const __m256 w = _mm256_set1_ps(p[j]);
      const float* v = values + j * D + i0;
      if (chunks == 8) {
        UNROLL for (int c = 0; c < 8; ++c) acc[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8 * c), acc[c]);
      } else {
        for (int c = 0; c < chunks; ++c) acc[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8 * c), acc[c]);
      }
    }
    for (int c = 0; c < chunks; ++c) {
      float* o = out + i0 + 8 * c;
      const __m256 r = _mm256_mul_ps(acc[c], scale8);
      _mm256_storeu_ps(o, add ? _mm256_add_ps(_mm256_loadu_ps(o), r) : r);
    }
  }
}

// Attention of one row's query heads that share a key/value head (GQA: `groups` of them) over keys
// 0..length-1 of the row's slot (`keys`, `values`, indexed by position). `scores` holds length floats.
void attend(const float* q, const float* keys, const float* values, int64_t length, int64_t groups, int64_t D,
            float* scores, float* out) {
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  for (int64_t g = 0; g < groups; ++g) {
    const float* qg = q + g * D;
    dot_keys(qg, keys, 0, length, D, scale, scores);
    const float inv = 1.f / exp_in_place(scores, length, max_of(scores, length, -INFINITY));
    weigh_values(scores, values, 0, length, D, inv, false, out + g * D);
  }
}

// ---- many queries over the shared prefix at once
//
// Every row that reads the shared prefix meets the same keys: a prefill's rows (one prompt's 15-20 new
// tokens) and a batched step's rows (one per slot) alike. Taken one query head at a time (`attend`), each
// key is loaded once per head and row and its dot product ends in a horizontal sum: the prefix's part of
// attention was a third of a 16-row prefill and of a 32-row step (AVX512-BF16 EPYC, 337-token prefix).
// Here the prefix's part of a task's queries (several rows times the query heads of one key/value head)
// is done as two small matrix products held in registers: scores against the keys stored transposed
// ([head_dim, P32], padded to 32 keys with zeros, so a vector holds one dimension of 8 or 16 keys), and the
// weighted values, each loaded value vector serving several queries.

constexpr int kScoreTile = 6;  // queries per tile of scores: 6 x 2 accumulators + 2 key vectors in 16 registers

// s[t][j .. j+16) = scale * q[t] . keys j .. j+15, for T queries; kt is [D, P32], the block starts at key j.
template <int T>
void score_tile(const float* const* q, const float* kt, int64_t P32, int64_t j, int64_t D, __m256 scale,
                float* const* s) {
  __m256 acc[T][2];
  UNROLL for (int t = 0; t < T; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const __m256 k0 = _mm256_loadu_ps(kt + d * P32 + j), k1 = _mm256_loadu_ps(kt + d * P32 + j + 8);
    UNROLL for (int t = 0; t < T; ++t) {
      const __m256 b = _mm256_broadcast_ss(q[t] + d);
      acc[t][0] = _mm256_fmadd_ps(b, k0, acc[t][0]);
      acc[t][1] = _mm256_fmadd_ps(b, k1, acc[t][1]);
    }
  }
  UNROLL for (int t = 0; t < T; ++t) {
    _mm256_storeu_ps(s[t] + j, _mm256_mul_ps(acc[t][0], scale));
    _mm256_storeu_ps(s[t] + j + 8, _mm256_mul_ps(acc[t][1], scale));
  }
}

// out[t][d0 .. d0 + 8C) += sum over prefix keys j < P of p[t][j] * value j, for T queries.
template <int T, int C>
void value_tile(const float* const* p, const float* values, int64_t P, int64_t D, int64_t d0, float* const* out) {
  __m256 acc[T][C];
  UNROLL for (int t = 0; t < T; ++t) UNROLL for (int c = 0; c < C; ++c) acc[t][c] = _mm256_setzero_ps();
  for (int64_t j = 0; j < P; ++j) {
    __m256 v[C];
    UNROLL for (int c = 0; c < C; ++c) v[c] = _mm256_loadu_ps(values + j * D + d0 + 8 * c);
    UNROLL for (int t = 0; t < T; ++t) {
      const __m256 w = _mm256_broadcast_ss(p[t] + j);
      UNROLL for (int c = 0; c < C; ++c) acc[t][c] = _mm256_fmadd_ps(w, v[c], acc[t][c]);
    }
  }
  UNROLL for (int t = 0; t < T; ++t) UNROLL for (int c = 0; c < C; ++c) {
    float* o = out[t] + d0 + 8 * c;
    _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), acc[t][c]));
  }
}

#if defined(__AVX512F__)
// The same tiles 16 floats wide, for the AVX512 builds (32 registers: 6 x 2 score and 4 x 4 value accumulators).
template <int T>
void score_tile512(const float* const* q, const float* kt, int64_t P32, int64_t j, int64_t D, __m512 scale,
                   float* const* s) {
  __m512 acc[T][2];
  UNROLL for (int t = 0; t < T; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const __m512 k0 = _mm512_loadu_ps(kt + d * P32 + j), k1 = _mm512_loadu_ps(kt + d * P32 + j + 16);
    UNROLL for (int t = 0; t < T; ++t) {
      const __m512 b = _mm512_set1_ps(q[t][d]);
      acc[t][0] = _mm512_fmadd_ps(b, k0, acc[t][0]);
      acc[t][1] = _mm512_fmadd_ps(b, k1, acc[t][1]);
    }
  }
  UNROLL for (int t = 0; t < T; ++t) {
    _mm512_storeu_ps(s[t] + j, _mm512_mul_ps(acc[t][0], scale));
    _mm512_storeu_ps(s[t] + j + 16, _mm512_mul_ps(acc[t][1], scale));
  }
}

template <int T>
void value_tile512(const float* const* p, const float* values, int64_t P, int64_t D, int64_t d0, float* const* out) {
  __m512 acc[T][4];
  UNROLL for (int t = 0; t < T; ++t) UNROLL for (int c = 0; c < 4; ++c) acc[t][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < P; ++j) {
    __m512 v[4];
    UNROLL for (int c = 0; c < 4; ++c) v[c] = _mm512_loadu_ps(values + j * D + d0 + 16 * c);
    UNROLL for (int t = 0; t < T; ++t) {
      const __m512 w = _mm512_set1_ps(p[t][j]);
      UNROLL for (int c = 0; c < 4; ++c) acc[t][c] = _mm512_fmadd_ps(w, v[c], acc[t][c]);
    }
  }
  UNROLL for (int t = 0; t < T; ++t) UNROLL for (int c = 0; c < 4; ++c) {
    float* o = out[t] + d0 + 16 * c;
    _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), acc[t][c]));
  }
}
#endif

// score tiles of every query for the block of 32 keys at j
void score_block(const float* const* q, int64_t nq, const float* kt, int64_t P32, int64_t j, int64_t D, float scale,
                 float* const* s) {
#if defined(__AVX512F__)
  const __m512 sc = _mm512_set1_ps(scale);
  int64_t t = 0;
  for (; t + kScoreTile <= nq; t += kScoreTile) score_tile512<kScoreTile>(q + t, kt, P32, j, D, sc, s + t);
  switch (nq - t) {
    case 5: score_tile512<5>(q + t, kt, P32, j, D, sc, s + t); break;
    case 4: score_tile512<4>(q + t, kt, P32, j, D, sc, s + t); break;
    case 3: score_tile512<3>(q + t, kt, P32, j, D, sc, s + t); break;
    case 2: score_tile512<2>(q + t, kt, P32, j, D, sc, s + t); break;
    case 1: score_tile512<1>(q + t, kt, P32, j, D, sc, s + t); break;
    default: break;
  }
#else
  const __m256 sc = _mm256_set1_ps(scale);
  for (int64_t half = j; half < j + 32; half += 16) {
    int64_t t = 0;
    for (; t + kScoreTile <= nq; t += kScoreTile) score_tile<kScoreTile>(q + t, kt, P32, half, D, sc, s + t);
    switch (nq - t) {
      case 5: score_tile<5>(q + t, kt, P32, half, D, sc, s + t); break;
      case 4: score_tile<4>(q + t, kt, P32, half, D, sc, s + t); break;
      case 3: score_tile<3>(q + t, kt, P32, half, D, sc, s + t); break;
      case 2: score_tile<2>(q + t, kt, P32, half, D, sc, s + t); break;
      case 1: score_tile<1>(q + t, kt, P32, half, D, sc, s + t); break;
      default: break;
    }
  }
#endif
}

// out[t] += the prefix's values weighted by p[t], for every query
void value_blocks(const float* const* p, int64_t nq, const float* values, int64_t P, int64_t D, float* const* out) {
  int64_t d0 = 0;
#if defined(__AVX512F__)
  for (; d0 + 64 <= D; d0 += 64) {
    int64_t t = 0;
    for (; t + 4 <= nq; t += 4) value_tile512<4>(p + t, values, P, D, d0, out + t);
    switch (nq - t) {
      case 3: value_tile512<3>(p + t, values, P, D, d0, out + t); break;
      case 2: value_tile512<2>(p + t, values, P, D, d0, out + t); break;
      case 1: value_tile512<1>(p + t, values, P, D, d0, out + t); break;
      default: break;
    }
  }
#endif
  // what 64-wide chunks leave (all of D on the AVX2 build): 32 dimensions for 2 queries at a time (8 + 4 of the
  // 16 registers), then 8 for 3
  for (; d0 + 32 <= D; d0 += 32) {
    int64_t t = 0;
    for (; t + 2 <= nq; t += 2) value_tile<2, 4>(p + t, values, P, D, d0, out + t);
    if (t < nq) value_tile<1, 4>(p + t, values, P, D, d0, out + t);
  }
  for (; d0 < D; d0 += 8) {
    int64_t t = 0;
    for (; t + 3 <= nq; t += 3) value_tile<3, 1>(p + t, values, P, D, d0, out + t);
    if (nq - t == 2) value_tile<2, 1>(p + t, values, P, D, d0, out + t);
    if (nq - t == 1) value_tile<1, 1>(p + t, values, P, D, d0, out + t);
  }
}

// Attention of nq queries (q[t], each D floats; query t belongs to a row with keys 0 .. lengths[t]-1, all
// longer than the prefix) of one key/value head: prefix keys 0 .. P-1 from kt ([D, P32], transposed) and
// prefix_values ([P, D]), the rest from the query's own slot (keys[t], values[t], indexed by position).
// scores: nq * stride floats, stride >= P32 and >= every length. out[t]: D floats, written.
void attend_prefix_block(const float* const* q, int64_t nq, const int64_t* lengths, const float* kt, int64_t P,
                         int64_t P32, const float* prefix_values, const float* const* keys,
                         const float* const* values, int64_t D, float* scores, int64_t stride, float* const* out) {
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  std::vector<float*> s(nq);
  for (int64_t t = 0; t < nq; ++t) s[t] = scores + t * stride;
  // the prefix's scores: key blocks outside, so a block's transposed keys (D x 32 floats) stay in L1
  for (int64_t j = 0; j < P32; j += 32) score_block(q, nq, kt, P32, j, D, scale, s.data());
  // each query's own keys, its softmax over all its keys (the sum kept), its own values' part; then the
  // prefix's weighted values, and both parts scaled by the softmax's 1/sum
  std::vector<float> inv(nq);
  for (int64_t t = 0; t < nq; ++t) {
    const int64_t length = lengths[t];
    dot_keys(q[t], keys[t], P, length, D, scale, s[t]);
    inv[t] = 1.f / exp_in_place(s[t], length, max_of(s[t], length, -INFINITY));
    weigh_values(s[t], values[t], P, length, D, 1.f, false, out[t]);
  }
  value_blocks(s.data(), nq, prefix_values, P, D, out);
  for (int64_t t = 0; t < nq; ++t) {  // the softmax's 1/sum once per output, not once per prefix key
    const __m256 inv8 = _mm256_set1_ps(inv[t]);
    for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(out[t] + d, _mm256_mul_ps(_mm256_loadu_ps(out[t] + d), inv8));
  }
}

// ---- fp32 <-> bf16 rows, for the bf16 GEMM's operands and the AMX tiles
//
// Rounded to nearest even with integer operations, as torch's vectorized conversion does (NaN becomes
// 0xFFFF, denormals are kept), so that rows converted here hold the bits `x.to(torch.bfloat16)` gives:
// vcvtneps2bf16 would treat denormal inputs as zero. bf16 -> fp32 is exact (the bits shifted up).
inline uint16_t bf16_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  if (std::isnan(x)) return 0xFFFF;
  return static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

inline float bf16_value(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float x;
  std::memcpy(&x, &bits, 4);
  return x;
}

#if defined(__AVX512F__)
// 16 floats to bf16 at out (bf16_bits in every lane)
inline void round16(__m512 v, uint16_t* out) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb)), 16);
  r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r, _mm512_set1_epi32(0xFFFF));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(r));
}

// 16 bf16 values as floats
inline __m512 widen16(const uint16_t* b) {
  const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}
#endif

void round_to_bf16(const float* x, int64_t n, uint16_t* out) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) round16(_mm512_loadu_ps(x + i), out + i);
#endif
  for (; i < n; ++i) out[i] = bf16_bits(x[i]);
}

void widen_bf16(const uint16_t* b, int64_t n, float* out) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, widen16(b + i));
#endif
  for (; i < n; ++i) out[i] = bf16_value(b[i]);
}

// x[0..n) += the bf16 values y[0..n): a residual add straight from the bf16 GEMM's output
void add_bf16(float* x, const uint16_t* y, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, _mm512_add_ps(_mm512_loadu_ps(x + i), widen16(y + i)));
#endif
  for (; i < n; ++i) x[i] += bf16_value(y[i]);
}

// ---- the prefix's part of many queries on AMX bf16 tiles (avx512vnni build, CPUs with amx_bf16)
//
// On AMX, oneDNN does the bf16 products of a 522-row prefill at 1.2-2.3 TFLOP/s and the fp32 register tiles
// above take the prefix's attention at the FMA rate (0.2-0.34 TFLOP/s measured): that attention became the
// largest part of the batched stage's prefill. Here both products of a block of up to 16 queries run on
// tiles (tdpbf16ps, fp32 sums): the scores against the prefix's keys as bf16 pairs ([D/2, P32, 2]: row k of a
// key tile holds dimensions 2k, 2k + 1 of 16 keys), and the weighted values against the values as bf16
// pairs ([P32/2, D, 2]: row k holds keys 2k, 2k + 1 of 16 dimensions). q, the probabilities and the values
// are rounded to bf16 (the rows' own keys and the softmax stay fp32): the run's KLD against fp32 says what
// that costs, and precision.gemm=fp32 turns it off with the bf16 products.
#if defined(__AVX512VNNI__)
#define PIPELINE_AMX_ATTENTION 1
#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512bf16,avx512f,avx512bw,avx512vl")))

// Linux gives a process the tiles' state only when asked (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA); it
// refuses where the CPU or kernel has no AMX.
bool amx_permitted() {
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

constexpr int64_t kAmxQueries = 16;  // queries a tile's rows hold
// calls with fewer rows reading the prefix take the fp32 tiles: a single prompt's prefill (15-20 rows) measured
// no faster on AMX (single stage 1.89-1.92 s against 1.82-2.14, AMX Xeon) and its KLD rose 2.7e-5 -> 3.4e-5;
// a one-row step's 3 queries would fill 3 of 16 tile rows
constexpr int64_t kAmxMinRows = 24;

// tiles 0-3: fp32 sums of 16 queries (scores of two blocks of 16 keys, or the outputs' four blocks of 16
// dimensions); 2, 3: the queries' bf16 dimensions 0-31, 32-63 (scores); 6: 32 probabilities of each query
// (values); 4, 5, 7: bf16 pairs of keys or values. Set before each block: oneDNN loads its own configuration.
AMX_TARGET void configure_attention_tiles() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.colsb[t] = 64;
    c.rows[t] = 16;
  }
  _tile_loadconfig(&c);
}

// fp32 -> bf16, rounded to nearest even, n a multiple of 16
AMX_TARGET void to_bf16(const float* x, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + i)));
}

// attend_prefix_block with the prefix's products on tiles; kb, vb: the prefix's keys and values as bf16 pairs
// of one key/value head (above). D must be 64 (SmolLM2, Llama's 64-dimension heads).
AMX_TARGET void attend_prefix_block_amx(const float* const* q, int64_t nq, const int64_t* lengths,
                                        const uint16_t* kb, const uint16_t* vb, int64_t P, int64_t P32,
                                        const float* const* keys, const float* const* values, int64_t D,
                                        float* scores, int64_t stride, float* const* out) {
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  alignas(64) uint16_t qb[kAmxQueries * 64];
  alignas(64) float ob[kAmxQueries * 64];
  // not cleared: a tile row's sums depend on its own row of queries or probabilities only, and rows past n are
  // not read back; the probabilities' padding keys are set to 0 below (the values' padding is 0, but 0 times
  // a stale NaN is not)
  std::unique_ptr<uint16_t[]> pb(new uint16_t[kAmxQueries * P32]);
  std::unique_ptr<float[]> sb(new float[kAmxQueries * P32]);
  configure_attention_tiles();
  for (int64_t b0 = 0; b0 < nq; b0 += kAmxQueries) {
    const int64_t n = std::min<int64_t>(kAmxQueries, nq - b0);
    std::fill(qb, qb + kAmxQueries * 64, 0);
    for (int64_t i = 0; i < n; ++i) to_bf16(q[b0 + i], 64, qb + i * 64);
    // scores of the prefix's keys, 32 at a time
    _tile_loadd(2, qb, 128);
    _tile_loadd(3, qb + 32, 128);
    for (int64_t j = 0; j < P32; j += 32) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_loadd(4, kb + j * 2, P32 * 4);
      _tile_loadd(5, kb + (16 * P32 + j) * 2, P32 * 4);
      _tile_dpbf16ps(0, 2, 4);
      _tile_loadd(7, kb + (j + 16) * 2, P32 * 4);
      _tile_dpbf16ps(0, 3, 5);
      _tile_loadd(5, kb + (16 * P32 + j + 16) * 2, P32 * 4);
      _tile_dpbf16ps(1, 2, 7);
      _tile_dpbf16ps(1, 3, 5);
      _tile_stored(0, sb.get() + j, P32 * 4);
      _tile_stored(1, sb.get() + j + 16, P32 * 4);
    }
    // each query's scores scaled, its own keys, the softmax's exponentials (the sum kept), its own values
    float inv[kAmxQueries];
    const __m512 sc = _mm512_set1_ps(scale);
    for (int64_t i = 0; i < n; ++i) {
      float* s = scores + (b0 + i) * stride;
      const float* raw = sb.get() + i * P32;
      // scaled, and their largest over the prefix's P keys (the padding's scores are not keys)
      __m512 top = _mm512_set1_ps(-INFINITY);
      for (int64_t j = 0; j < P32; j += 16) {
        const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(raw + j), sc);
        _mm512_storeu_ps(s + j, v);
        const __mmask16 keys_here = P - j >= 16 ? 0xFFFF : (P > j ? (1u << (P - j)) - 1 : 0);
        top = _mm512_mask_max_ps(top, keys_here, top, v);
      }
      const int64_t length = lengths[b0 + i];
      dot_keys(q[b0 + i], keys[b0 + i], P, length, D, scale, s);
      const float most = max_of(s + P, length - P, _mm512_reduce_max_ps(top));
      inv[i] = 1.f / exp_in_place(s, length, most);
      weigh_values(s, values[b0 + i], P, length, D, 1.f, false, out[b0 + i]);
      // the prefix's probabilities in bf16; keys P .. P32 stay 0 (the values' padding is 0 too)
      uint16_t* p = pb.get() + i * P32;
      int64_t j = 0;
      for (; j + 16 <= P; j += 16) to_bf16(s + j, 16, p + j);
      for (; j < P; ++j) p[j] = bf16_bits(s[j]);
      std::fill(p + P, p + P32, 0);
    }
    // the prefix's weighted values: 32 keys at a time into four blocks of 16 dimensions
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t j = 0; j < P32; j += 32) {
      const uint16_t* v = vb + (j / 2) * D * 2;
      _tile_loadd(6, pb.get() + j, P32 * 2);
      _tile_loadd(4, v, D * 4);
      _tile_loadd(5, v + 32, D * 4);
      _tile_dpbf16ps(0, 6, 4);
      _tile_loadd(7, v + 64, D * 4);
      _tile_dpbf16ps(1, 6, 5);
      _tile_loadd(4, v + 96, D * 4);
      _tile_dpbf16ps(2, 6, 7);
      _tile_dpbf16ps(3, 6, 4);
    }
    _tile_stored(0, ob, 256);
    _tile_stored(1, ob + 16, 256);
    _tile_stored(2, ob + 32, 256);
    _tile_stored(3, ob + 48, 256);
    for (int64_t i = 0; i < n; ++i) {
      const __m512 iv = _mm512_set1_ps(inv[i]);
      float* o = out[b0 + i];
      for (int64_t d = 0; d < 64; d += 16)
        _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_add_ps(_mm512_loadu_ps(o + d), _mm512_loadu_ps(ob + i * 64 + d)), iv));
    }
  }
  _tile_release();
}
#endif

bool amx_attention() {
#if defined(PIPELINE_AMX_ATTENTION)
  return amx_permitted();
#else
  return false;
#endif
}

// Scratch memory a thread's layer calls reuse, grown to the largest call and never cleared. Four zeroed
// std::vectors a call were 13 MB to allocate and clear per layer of a 522-row prefill, on the calling thread
// while the other waited: memset and malloc were 7% of the main thread's samples in the batched stage (AMX
// Xeon, perf).
// Aligned to 64 bytes, as torch's own allocations are: oneDNN reads the bf16 GEMM's input rows from here, and the
// rows of SmolLM2's matrices are whole cache lines, so each row starts on one.
template <typename T>
struct Scratch {
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> data;
  int64_t size = 0;
  T* get(int64_t n) {
    if (n > size) {
      const size_t bytes = (static_cast<size_t>(n) * sizeof(T) + 63) / 64 * 64;
      data.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));  // uninitialized: every user writes first
      TORCH_CHECK(data, "decoder_layer: no memory for ", bytes, " bytes of scratch rows");
      size = n;
    }
    return data.get();
  }
};
thread_local Scratch<float> layer_scratch;
thread_local Scratch<uint16_t> layer_scratch_bf16;  // the bf16 GEMM's input rows

// h [M, hidden] += attention(norm(h)); h += mlp(norm(h)), for M rows that each sit in cache slot
// slots[r] at position positions[r]. All rows' keys and values are written to the cache before any row
// attends, so the rows of one prompt's prefill see each other (causally, by position).
// weights: qkv (q, k rows interleaved for the rotary pairs), o, gate_up, down; each q4 or q8.
// rotations: [capacity, head_dim / 2, 2] cos, sin.
// prefix_kt, prefix_v: the shared prefix's keys, transposed and padded with zeros to a multiple of 32 keys
// ([kv_heads, head_dim, P32]), and its values ([kv_heads, P, head_dim]), once; shared[r] (0 or P) says how
// many of row r's first keys are read there; its slot's first P positions are then not read at all.
void decoder_layer(const at::Tensor& h, const at::Tensor& slots, const at::Tensor& positions,
                   const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& rotations,
                   const at::Tensor& attn_norm, const at::Tensor& mlp_norm, double eps, int64_t heads,
                   at::TensorList weight_list, bool int8_x, int64_t gemm_above,
                   const std::optional<at::Tensor>& prefix_kt, const std::optional<at::Tensor>& prefix_v,
                   const std::optional<at::Tensor>& shared, int64_t tile_rows, bool tile_split,
                   const std::optional<at::Tensor>& prefix_kb, const std::optional<at::Tensor>& prefix_vb) {
  TORCH_CHECK(h.dim() == 2 && h.scalar_type() == at::kFloat && h.is_contiguous(),
              "decoder_layer: h must be contiguous float32 [M, hidden]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes() &&
                  v_cache.is_contiguous() && k_cache.scalar_type() == at::kFloat,
              "decoder_layer: caches must be contiguous float32 [slots, kv_heads, capacity, head_dim]");
  const int64_t M = h.size(0), H = h.size(1);
  const int64_t kv_heads = k_cache.size(1), capacity = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(heads * D == H && heads % kv_heads == 0 && D % 8 == 0, "decoder_layer: ", heads, " heads of ", D,
              " do not fit hidden ", H, " and ", kv_heads, " kv heads");
  TORCH_CHECK(rotations.scalar_type() == at::kFloat && rotations.is_contiguous() && rotations.dim() == 3 &&
                  rotations.size(0) >= capacity && rotations.size(1) * 2 == D,
              "decoder_layer: rotations must be float32 [capacity, head_dim/2, 2]");
  const at::Tensor slot_ids = slots.to(at::kLong).contiguous(), pos = positions.to(at::kLong).contiguous();
  TORCH_CHECK(slot_ids.numel() == M && pos.numel() == M, "decoder_layer: one slot and position per row");
  const int64_t* sl = slot_ids.data_ptr<int64_t>();
  const int64_t* ps = pos.data_ptr<int64_t>();
  for (int64_t r = 0; r < M; ++r)
    TORCH_CHECK(sl[r] >= 0 && sl[r] < k_cache.size(0) && ps[r] >= 0 && ps[r] < capacity,
                "decoder_layer: row ", r, " at slot ", sl[r], " position ", ps[r], " is outside the cache");
  const bool has_prefix = prefix_kt.has_value() && prefix_kt->numel() > 0;
  int64_t width = 0, width32 = 0;
  const int64_t* row_shared = nullptr;
  at::Tensor shared_ids;
  if (has_prefix) {
    TORCH_CHECK(prefix_v.has_value() && shared.has_value(), "decoder_layer: prefix_kt needs prefix_v and shared");
    TORCH_CHECK(prefix_v->dim() == 3 && prefix_v->scalar_type() == at::kFloat && prefix_v->is_contiguous() &&
                    prefix_v->size(0) == kv_heads && prefix_v->size(2) == D && prefix_v->size(1) <= capacity,
                "decoder_layer: the prefix's values must be contiguous float32 [kv_heads, P, head_dim]");
    width = prefix_v->size(1);
    width32 = prefix_kt->dim() == 3 ? prefix_kt->size(2) : 0;
    TORCH_CHECK(prefix_kt->dim() == 3 && prefix_kt->scalar_type() == at::kFloat && prefix_kt->is_contiguous() &&
                    prefix_kt->size(0) == kv_heads && prefix_kt->size(1) == D && width32 % 32 == 0 &&
                    width32 >= width && width32 < width + 32,
                "decoder_layer: the prefix's keys must be contiguous float32 [kv_heads, head_dim, P32], transposed "
                "and padded to a multiple of 32 keys");
    shared_ids = shared->to(at::kLong).contiguous();
    TORCH_CHECK(shared_ids.numel() == M, "decoder_layer: one shared width per row");
    row_shared = shared_ids.data_ptr<int64_t>();
    for (int64_t r = 0; r < M; ++r)
      TORCH_CHECK(row_shared[r] == 0 || (row_shared[r] == width && ps[r] >= width), "decoder_layer: row ", r,
                  " at position ", ps[r], " cannot read ", row_shared[r], " keys of a prefix of ", width);
  }
  // the prefix's keys and values as bf16 pairs, for its products on AMX tiles (attend_prefix_block_amx)
  const bool amx = has_prefix && prefix_kb.has_value() && prefix_kb->numel() > 0;
  if (amx) {
    TORCH_CHECK(amx_attention(), "decoder_layer: prefix_kb asks for attention on AMX tiles, which this build or CPU "
                "does not have (pipeline.kernels.amx_attention() says whether it does)");
    TORCH_CHECK(D == 64, "decoder_layer: attention on AMX tiles takes heads of 64 dimensions, not ", D);
    TORCH_CHECK(prefix_vb.has_value() && prefix_kb->scalar_type() == at::kBFloat16 && prefix_kb->is_contiguous() &&
                    prefix_kb->sizes() == at::IntArrayRef({kv_heads, D / 2, width32, 2}) &&
                    prefix_vb->scalar_type() == at::kBFloat16 && prefix_vb->is_contiguous() &&
                    prefix_vb->sizes() == at::IntArrayRef({kv_heads, width32 / 2, D, 2}),
                "decoder_layer: the prefix's bf16 pairs must be contiguous bfloat16 [kv_heads, head_dim/2, P32, 2] "
                "(keys) and [kv_heads, P32/2, head_dim, 2] (values)");
  }
  if (M == 0) return;
  const uint16_t* pkb = amx ? reinterpret_cast<const uint16_t*>(prefix_kb->data_ptr<at::BFloat16>()) : nullptr;
  const uint16_t* pvb = amx ? reinterpret_cast<const uint16_t*>(prefix_vb->data_ptr<at::BFloat16>()) : nullptr;
  const float* pkc = has_prefix ? prefix_kt->data_ptr<float>() : nullptr;
  const float* pvc = has_prefix ? prefix_v->data_ptr<float>() : nullptr;

  const std::vector<at::Tensor> weights = weight_list.vec();
  size_t i = 0;
  const Packed qkv = next_packed(weights, i, H, gemm_above, tile_rows, tile_split, "qkv");
  const Packed o = next_packed(weights, i, H, gemm_above, tile_rows, tile_split, "o");
  const Packed gate_up = next_packed(weights, i, H, gemm_above, tile_rows, tile_split, "gate_up");
  const int64_t I = gate_up.N / 2;
  const Packed down = next_packed(weights, i, I, gemm_above, tile_rows, tile_split, "down");
  TORCH_CHECK(qkv.N == H + 2 * kv_heads * D && o.N == H && down.N == H && gate_up.N == 2 * I,
              "decoder_layer: weight shapes do not match hidden ", H, " and the cache");

  float* x = h.data_ptr<float>();
  const int64_t QKV = qkv.N, groups = heads / kv_heads;
  // the layer's scratch rows, each written in full before it is read, so not cleared (see Scratch)
  float* const scratch = layer_scratch.get(M * (std::max(H, I) + QKV + H + 2 * I));
  float* const normed = scratch;
  float* const mixed = normed + M * std::max(H, I);
  float* const attended = mixed + M * QKV;
  float* const projected = attended + M * H;
  // A product that takes the bf16 GEMM (a prefill, a batched step past the tiles) gets its input rows in bf16
  // from the loop before it, and the loop after it reads its bf16 output: torch's conversions, a pass over the
  // rows and an allocation each way, were 9% of the batched stage (AMX Xeon, torch.profiler). Same bits.
  const bool qkv_b = qkv.bf16_gemm(M), o_b = o.bf16_gemm(M), gate_up_b = gate_up.bf16_gemm(M),
             down_b = down.bf16_gemm(M);
  uint16_t* const normed_b =
      qkv_b || o_b || gate_up_b || down_b ? layer_scratch_bf16.get(M * (std::max(H, I) + H)) : nullptr;
  uint16_t* const attended_b = normed_b ? normed_b + M * std::max(H, I) : nullptr;
  const float* rot = rotations.data_ptr<float>();
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();

  // attention
  // row-wise work is split over threads only for many rows (a prefill): for a decode step forking costs more
  const auto by_rows = [M](const std::function<void(int64_t)>& body) {
    at::parallel_for(0, M, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) body(r);
    });
  };
  by_rows([&](int64_t r) {
    rms_norm_rows(x + r * H, attn_norm.data_ptr<float>(), 1, H, eps, normed + r * H);
    if (qkv_b) round_to_bf16(normed + r * H, H, normed_b + r * H);
  });
  const Bf16Rows qkv_rows = qkv.product(normed, normed_b, M, mixed, int8_x);
  by_rows([&](int64_t r) {
    float* row = mixed + r * QKV;
    if (qkv_rows) widen_bf16(qkv_rows.row(r), QKV, row);
    rotate_heads(row, heads + kv_heads, rot + ps[r] * D, D);
    for (int64_t g = 0; g < kv_heads; ++g) {
      const int64_t at_ = ((sl[r] * kv_heads + g) * capacity + ps[r]) * D;
      std::copy_n(row + (heads + g) * D, D, kc + at_);
      std::copy_n(row + (heads + kv_heads + g) * D, D, vc + at_);
    }
  });
  // (Tried before: the prefix's part of all rows' attention as two batched MKL matrix products per layer,
  // Hydragen's split, with the two parts' softmaxes merged after: slower than one query at a time, 32 rows
  // 27.2 vs 24.5 ms, 512 rows 296 vs 268 ms for 30 layers, AVX512-BF16 EPYC. The register tiles below need
  // no merge, no call set-up, and keep each task's keys in L1.)
  // rows that read the prefix, in tasks of a few rows and one key/value head (attend_prefix_block), a lone
  // row too; the others (no shared prefix) one row and key/value head a task (attend). A slot's own first P
  // positions are never read for a row that shares the prefix, so the engine does not copy the prefix into
  // every slot (0.5 GB for 32 slots of SmolLM2). A lone row here and from its slot's copy measured the same
  // (single stage 1.03x, batched 0.99x, 6 interleaved rounds, AVX512-BF16 EPYC).
  std::vector<int64_t> with_prefix, without;
  for (int64_t r = 0; r < M; ++r) (row_shared && row_shared[r] ? with_prefix : without).push_back(r);
  // rows per task: up to 8 (24 queries for SmolLM2's 3 query heads per key head), fewer where that would
  // leave under 4 tasks a thread (4 rows in 3 tasks kept one of two threads waiting for the other)
  const int64_t sharing = static_cast<int64_t>(with_prefix.size());
  const int64_t per_task = std::clamp<int64_t>(sharing * kv_heads / (4 * at::get_num_threads()), 1, 8);
  const int64_t chunks = (sharing + per_task - 1) / per_task;
  const int64_t block_tasks = chunks * kv_heads;
  const int64_t tasks = block_tasks + static_cast<int64_t>(without.size()) * kv_heads;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<const float*> q, keys, values;
    std::vector<float*> out;
    std::vector<int64_t> lengths;
    for (int64_t t = begin; t < end; ++t) {
      if (t < block_tasks) {
        const int64_t g = t / chunks, first = (t % chunks) * per_task;  // a thread's tasks share key heads
        const int64_t last = std::min<int64_t>(first + per_task, sharing);
        q.clear(), keys.clear(), values.clear(), out.clear(), lengths.clear();
        int64_t stride = width32;
        for (int64_t i = first; i < last; ++i) {
          const int64_t r = with_prefix[i], base = (sl[r] * kv_heads + g) * capacity * D;
          stride = std::max(stride, ps[r] + 1);
          for (int64_t j = 0; j < groups; ++j) {
            q.push_back(mixed + r * QKV + (g * groups + j) * D);
            out.push_back(attended + r * H + (g * groups + j) * D);
            keys.push_back(kc + base);
            values.push_back(vc + base);
            lengths.push_back(ps[r] + 1);
          }
        }
        scores.resize(q.size() * stride);
        bool done = false;
#if defined(PIPELINE_AMX_ATTENTION)
        if (amx && sharing >= kAmxMinRows) {
          attend_prefix_block_amx(q.data(), q.size(), lengths.data(), pkb + g * D * width32, pvb + g * width32 * D,
                                  width, width32, keys.data(), values.data(), D, scores.data(), stride, out.data());
          done = true;
        }
#endif
        if (!done)
          attend_prefix_block(q.data(), q.size(), lengths.data(), pkc + g * D * width32, width, width32,
                              pvc + g * width * D, keys.data(), values.data(), D, scores.data(), stride, out.data());
        if (o_b)  // the o product's input, while the task's outputs are in L1
          for (float* y : out) round_to_bf16(y, D, attended_b + (y - attended));
        continue;
      }
      const int64_t r = without[(t - block_tasks) / kv_heads], g = (t - block_tasks) % kv_heads, length = ps[r] + 1;
      scores.resize(length);
      const int64_t base = (sl[r] * kv_heads + g) * capacity * D;
      float* y = attended + r * H + g * groups * D;
      attend(mixed + r * QKV + g * groups * D, kc + base, vc + base, length, groups, D, scores.data(), y);
      if (o_b) round_to_bf16(y, groups * D, attended_b + (y - attended));
    }
  });
  const Bf16Rows o_rows = o.product(attended, attended_b, M, normed, int8_x);
  by_rows([&](int64_t r) {
    if (o_rows)
      add_bf16(x + r * H, o_rows.row(r), H);
    else
      for (int64_t j = r * H; j < (r + 1) * H; ++j) x[j] += normed[j];
    rms_norm_rows(x + r * H, mlp_norm.data_ptr<float>(), 1, H, eps, normed + r * H);
    if (gate_up_b) round_to_bf16(normed + r * H, H, normed_b + r * H);
  });

  // MLP
  const Bf16Rows gate_up_rows = gate_up.product(normed, normed_b, M, projected, int8_x);
  by_rows([&](int64_t r) {
#if defined(__AVX512F__)
    if (gate_up_rows && down_b && I % 16 == 0) {  // bf16 in and out, in registers: the same bits as below
      const uint16_t* gate = gate_up_rows.row(r);
      for (int64_t j = 0; j < I; j += 16) {
        const __m512 g = widen16(gate + j);
        const __m512 sig = _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)));
        round16(_mm512_mul_ps(_mm512_div_ps(g, sig), widen16(gate + I + j)), normed_b + r * I + j);
      }
      return;
    }
#endif
    float* gate = projected + r * 2 * I;
    if (gate_up_rows) widen_bf16(gate_up_rows.row(r), 2 * I, gate);
    float* act = normed + r * I;
    int64_t j = 0;
#if defined(__AVX512F__)
    for (; j + 16 <= I; j += 16) {  // the same bits as the 8 lanes below: exp16 is exp8 16 lanes wide
      const __m512 g = _mm512_loadu_ps(gate + j);
      const __m512 sig = _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)));
      _mm512_storeu_ps(act + j, _mm512_mul_ps(_mm512_div_ps(g, sig), _mm512_loadu_ps(gate + I + j)));
    }
#endif
    for (; j + 8 <= I; j += 8) {  // silu(gate) * up
      const __m256 g = _mm256_loadu_ps(gate + j);
      const __m256 sig = _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), g)));
      _mm256_storeu_ps(act + j, _mm256_mul_ps(_mm256_div_ps(g, sig), _mm256_loadu_ps(gate + I + j)));
    }
    for (; j < I; ++j) act[j] = gate[j] / (1.f + std::exp(-gate[j])) * gate[I + j];
    if (down_b) round_to_bf16(act, I, normed_b + r * I);
  });
  const Bf16Rows down_rows = down.product(normed, normed_b, M, attended, int8_x);
  by_rows([&](int64_t r) {
    if (down_rows)
      add_bf16(x + r * H, down_rows.row(r), H);
    else
      for (int64_t j = r * H; j < (r + 1) * H; ++j) x[j] += attended[j];
  });
}

}  // namespace

// One build per instruction set (pipeline.kernels compiles this file with that ISA's flags), each in its own
// op namespace, pipeline_avx2 or pipeline_avx512, so that the builds of two CPU kinds can be loaded by one
// process (the tests run every kind). The indirection expands PIPELINE_NS before TORCH_LIBRARY stringifies it.
#ifndef PIPELINE_NS
#define PIPELINE_NS pipeline_avx2
#endif
#define PIPELINE_LIBRARY_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define PIPELINE_LIBRARY_IMPL(ns, k, m) TORCH_LIBRARY_IMPL(ns, k, m)

// A fragment, not TORCH_LIBRARY: another extension of the project may add ops to the same namespace.
// x rounded to bf16 as the layer rounds the bf16 GEMM's inputs (round_to_bf16): the tests hold it to torch's bits
at::Tensor round_bf16(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "round_bf16: x must be float32");
  const at::Tensor in = x.contiguous();
  at::Tensor out = at::empty(in.sizes(), at::kBFloat16);
  round_to_bf16(in.data_ptr<float>(), in.numel(), reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
  return out;
}

PIPELINE_LIBRARY_FRAGMENT(PIPELINE_NS, m) {
  m.def("q4_linear(Tensor x, Tensor qweight, Tensor scales, Tensor mins, bool int8_x=False) -> Tensor");
  m.def("q8_linear(Tensor x, Tensor qweight, Tensor scales, bool int8_x=False) -> Tensor");
  m.def("q4_dequantize(Tensor qweight, Tensor scales, Tensor mins, Tensor? rows=None) -> Tensor");
  m.def("q8_dequantize(Tensor qweight, Tensor scales, Tensor? rows=None) -> Tensor");
  m.def("q4_gemm_i8(Tensor x, Tensor tiles, bool split=False) -> Tensor");
  m.def(
      "decoder_layer(Tensor(a!) h, Tensor slots, Tensor positions, Tensor(b!) k_cache, Tensor(c!) v_cache, "
      "Tensor rotations, Tensor attn_norm, Tensor mlp_norm, float eps, int heads, Tensor[] weights, "
      "bool int8_x=False, int gemm_above=9223372036854775807, Tensor? prefix_kt=None, Tensor? prefix_v=None, "
      "Tensor? shared=None, int tile_rows=0, bool tile_split=True, Tensor? prefix_kb=None, Tensor? prefix_vb=None) -> ()");
  m.def("amx_attention() -> bool", &amx_attention);
  m.def("round_bf16(Tensor x) -> Tensor");
}

PIPELINE_LIBRARY_IMPL(PIPELINE_NS, CPU, m) {
  m.impl("q4_linear", &q4_linear);
  m.impl("q8_linear", &q8_linear);
  m.impl("q4_dequantize", &q4_dequantize);
  m.impl("q8_dequantize", &q8_dequantize);
  m.impl("q4_gemm_i8", &q4_gemm_i8);
  m.impl("round_bf16", &round_bf16);
  m.impl("decoder_layer", &decoder_layer);
}

// The weights list may hold oneDNN-packed tensors (MkldnnCPU), which would otherwise decide the dispatch.
PIPELINE_LIBRARY_IMPL(PIPELINE_NS, MkldnnCPU, m) { m.impl("decoder_layer", &decoder_layer); }
