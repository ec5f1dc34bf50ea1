// See logprob_kernels.h for the symbols. Portable vectorisation: the row loops are plain arithmetic
// (no libm calls, no -ffast-math) that GCC/Clang auto-vectorise, compiled three times through
// target_clones (AVX-512, AVX2+FMA, baseline) and picked at load time by the ifunc resolver, so
// the module runs on any x86-64 and uses the widest unit the machine has. Other architectures get
// the baseline build.
#include "logprob_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#ifdef _OPENMP
#include <omp.h>
#endif

// The row helpers must be inlined into each clone: a helper compiled once (baseline ISA) and
// called from the AVX-512 clone would run at baseline speed.
#if defined(__GNUC__)
#define AK_INLINE inline __attribute__((always_inline))
#else
#define AK_INLINE inline
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(ALIGNKIT_NO_CLONES)
#define AK_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define AK_HAVE_CLONES 1
#else
#define AK_CLONES
#define AK_HAVE_CLONES 0
#endif

namespace alignkit {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Below this many tile elements a parallel region costs more than it saves (measured on a 2-core
// EPYC: ~20 µs of fork/join against ~1 ns per element).
constexpr int64_t kMinParallelElems = 1 << 15;
constexpr int64_t kSumBlock = 256;

// exp(x) for fp32, Cephes-style: x = n·ln2 + r with |r| ≤ ln2/2, a degree-6 polynomial for e^r and
// 2^n from the exponent bits. Max relative error ~2 ulp on [-87, 88]. The round-to-nearest uses
// the 1.5·2²³ trick so it vectorises on every ISA. NaN propagates.
AK_INLINE float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : x;  // keeps 2^n normal; exp(-87) ~ 1.6e-38 is below any useful sum
  x = x > 88.0f ? 88.0f : x;
  const float t = x * 1.44269504088896341f + 12582912.0f;
  const float n = t - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  // n sits in t's low mantissa bits (t = 1.5·2²³ + n): take it from there, with integer ops only,
  // so a NaN input stays defined behaviour (a float→int cast of NaN is UB) and comes out NaN.
  int32_t tb;
  std::memcpy(&tb, &t, sizeof(tb));
  const int32_t bits = (tb - 0x4B400000 + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

// tanh(u): odd Taylor series for |u| < 1/16 (no cancellation), (1 − e^{−2|u|})/(1 + e^{−2|u|})
// otherwise.
AK_INLINE float fast_tanh(float u) {
  const float au = u < 0.0f ? -u : u;
  const float e = fast_exp(-2.0f * au);
  float big = (1.0f - e) / (1.0f + e);
  big = u < 0.0f ? -big : big;
  const float u2 = u * u;
  const float small = u * (1.0f + u2 * (-1.0f / 3.0f + u2 * (2.0f / 15.0f + u2 * (-17.0f / 315.0f))));
  return au < 0.0625f ? small : big;
}

AK_INLINE float bf16_to_f32(uint16_t b) {
  uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

struct LoadF32 {
  const float* p;
  AK_INLINE float operator()(int64_t j) const { return p[j]; }
};
struct LoadBF16 {
  const uint16_t* p;
  AK_INLINE float operator()(int64_t j) const { return bf16_to_f32(p[j]); }
};

// z from x; the softcap branch is hoisted out of the loops by the callers' `if (cap > 0)`.
AK_INLINE float capped(float x, float inv_temp, float cap, float inv_cap) {
  return cap * fast_tanh(x * inv_cap) * inv_temp;
}

// z − m clamped below at −88, where fast_exp already flattens (exp(−87) ~ 1.6e-38): a −inf logit
// (masked by the bias) then gives e·(z − m) ~ −1e-36, not 0·(−inf) = NaN, in the entropy and its
// gradient. NaN passes through (a comparison with NaN is false), as IEEE arithmetic wants.
AK_INLINE float clamp_zm(float zm) { return zm < -88.0f ? -88.0f : zm; }

template <class Load>
AK_INLINE void fold_row(Load x, int64_t cols, int64_t tj, float& m, float& s, float* a, float& tgt,
                     float inv_temp, float cap) {
  const float inv_cap = cap > 0.0f ? 1.0f / cap : 0.0f;
  float mx = kNegInf;
  if (cap > 0.0f) {
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < cols; ++j) mx = std::max(mx, capped(x(j), inv_temp, cap, inv_cap));
  } else {
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < cols; ++j) mx = std::max(mx, x(j) * inv_temp);
  }
  // std::max skips a NaN, but the sum below does not: exp(NaN − m) poisons the row, as it should.
  const float m_new = std::max(m, mx);
  // A block of −inf logits only (masked by the bias) has m_new = −inf: shift by 0 instead, so no
  // −inf − (−inf); its sums are discarded by the rescale (scale = 0 while m is −inf).
  const float mref = m_new == kNegInf ? 0.0f : m_new;
  // Sums in blocks of kSumBlock with per-lane fp32 partials, blocks added in double: the error
  // of a long fp32 running sum grows with V; this keeps it at a few ulp, like torch's cascade sum.
  double sum = 0.0, sa = 0.0;
  for (int64_t j0 = 0; j0 < cols; j0 += kSumBlock) {
    const int64_t j1 = std::min(cols, j0 + kSumBlock);
    float bs = 0.0f, ba = 0.0f;
    if (cap > 0.0f) {
#pragma omp simd reduction(+ : bs, ba)
      for (int64_t j = j0; j < j1; ++j) {
        const float zm = clamp_zm(capped(x(j), inv_temp, cap, inv_cap) - mref);
        const float e = fast_exp(zm);
        bs += e;
        ba += e * zm;
      }
    } else {
#pragma omp simd reduction(+ : bs, ba)
      for (int64_t j = j0; j < j1; ++j) {
        const float zm = clamp_zm(x(j) * inv_temp - mref);
        const float e = fast_exp(zm);
        bs += e;
        ba += e * zm;
      }
    }
    sum += bs;
    sa += ba;
  }
  if (tj >= 0 && tj < cols) tgt = cap > 0.0f ? capped(x(tj), inv_temp, cap, inv_cap) : x(tj) * inv_temp;
  // First tile: m = -inf, s = a = 0, so the rescale factor multiplies zeros.
  const float scale = (m == kNegInf) ? 0.0f : std::exp(m - m_new);
  // a is kept relative to the running max (Σ e·(z − m)), so entropy = log s − a/s never subtracts
  // two numbers of the logits' magnitude. A new max shifts the old terms by (m − m_new).
  if (a) *a = static_cast<float>((*a + (m == kNegInf ? 0.0f : (m - m_new) * s)) * scale + sa);
  s = static_cast<float>(s * scale + sum);
  m = m_new;
}

template <class Load>
AK_INLINE void grad_row(Load x, float* out, int64_t cols, int64_t tj, float m, float logs, float g,
                     float ent, float ge, bool has_ent, float inv_temp, float cap) {
  const float inv_cap = cap > 0.0f ? 1.0f / cap : 0.0f;
  const float shift = logs - ent;  // z − lse + H = (z − m) − shift
  // dz/dx at the target, read before the loop: `out` may alias the tile (in-place backward).
  const bool has_t = tj >= 0 && tj < cols;
  float dzdx_t = inv_temp;
  if (has_t && cap > 0.0f) {
    const float t = std::tanh(x(tj) * inv_cap);
    dzdx_t = (1.0f - t * t) * inv_temp;
  }
  if (cap > 0.0f) {
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) {
      const float t = fast_tanh(x(j) * inv_cap);
      const float zm = clamp_zm(cap * t * inv_temp - m);
      const float p = fast_exp(zm - logs);
      float d = -g * p;
      if (has_ent) d -= ge * p * (zm - shift);
      out[j] = d * (1.0f - t * t) * inv_temp;
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) {
      const float zm = clamp_zm(x(j) * inv_temp - m);
      const float p = fast_exp(zm - logs);
      float d = -g * p;
      if (has_ent) d -= ge * p * (zm - shift);
      out[j] = d * inv_temp;
    }
  }
  if (has_t) out[tj] += g * dzdx_t;
}

AK_CLONES void fold_rows_f32(const float* tile, int64_t r0, int64_t r1, int64_t cols, int64_t ld,
                             const int64_t* targets, int64_t col0, float* m, float* s, float* a,
                             float* tgt, float inv_temp, float cap) {
  for (int64_t r = r0; r < r1; ++r)
    fold_row(LoadF32{tile + r * ld}, cols, targets[r] - col0, m[r], s[r], a ? a + r : nullptr,
             tgt[r], inv_temp, cap);
}

AK_CLONES void fold_rows_bf16(const uint16_t* tile, int64_t r0, int64_t r1, int64_t cols,
                              int64_t ld, const int64_t* targets, int64_t col0, float* m, float* s,
                              float* a, float* tgt, float inv_temp, float cap) {
  for (int64_t r = r0; r < r1; ++r)
    fold_row(LoadBF16{tile + r * ld}, cols, targets[r] - col0, m[r], s[r], a ? a + r : nullptr,
             tgt[r], inv_temp, cap);
}

AK_CLONES void grad_rows_f32(const float* in, int64_t ld, float* out, int64_t ld_out, int64_t r0,
                             int64_t r1, int64_t cols, const int64_t* targets, int64_t col0,
                             const float* m, const float* logs, const float* g_lp,
                             const float* ent,
                             const float* g_ent, float inv_temp, float cap) {
  for (int64_t r = r0; r < r1; ++r)
    grad_row(LoadF32{in + r * ld}, out + r * ld_out, cols, targets[r] - col0, m[r], logs[r], g_lp[r],
             ent ? ent[r] : 0.0f, g_ent ? g_ent[r] : 0.0f, g_ent != nullptr, inv_temp, cap);
}

AK_CLONES void grad_rows_bf16(const uint16_t* in, int64_t ld, float* out, int64_t ld_out,
                              int64_t r0, int64_t r1, int64_t cols, const int64_t* targets,
                              int64_t col0, const float* m, const float* logs, const float* g_lp,
                              const float* ent,
                              const float* g_ent, float inv_temp, float cap) {
  for (int64_t r = r0; r < r1; ++r)
    grad_row(LoadBF16{in + r * ld}, out + r * ld_out, cols, targets[r] - col0, m[r], logs[r], g_lp[r],
             ent ? ent[r] : 0.0f, g_ent ? g_ent[r] : 0.0f, g_ent != nullptr, inv_temp, cap);
}

// Static split of rows over threads: every row costs the same, and a fixed split keeps the result
// bitwise independent of scheduling (each row is reduced by exactly one thread, in order).
template <class F>
void parallel_rows(int64_t rows, int64_t cols, int nthreads, F&& body) {
#ifdef _OPENMP
  if (nthreads > 1 && rows > 1 && rows * cols >= kMinParallelElems) {
    const int nt = static_cast<int>(std::min<int64_t>(nthreads, rows));
#pragma omp parallel num_threads(nt)
    {
      const int t = omp_get_thread_num();
      const int64_t r0 = rows * t / nt, r1 = rows * (t + 1) / nt;
      body(r0, r1);
    }
    return;
  }
#endif
  (void)nthreads;
  (void)cols;
  body(0, rows);
}

}  // namespace

void fold_f32(const float* tile, int64_t rows, int64_t cols, int64_t ld, const int64_t* targets,
              int64_t col0, float* m, float* s, float* a, float* tgt, float inv_temp, float softcap,
              int nthreads) {
  parallel_rows(rows, cols, nthreads, [&](int64_t r0, int64_t r1) {
    fold_rows_f32(tile, r0, r1, cols, ld, targets, col0, m, s, a, tgt, inv_temp, softcap);
  });
}

void fold_bf16(const uint16_t* tile, int64_t rows, int64_t cols, int64_t ld, const int64_t* targets,
               int64_t col0, float* m, float* s, float* a, float* tgt, float inv_temp, float softcap,
               int nthreads) {
  parallel_rows(rows, cols, nthreads, [&](int64_t r0, int64_t r1) {
    fold_rows_bf16(tile, r0, r1, cols, ld, targets, col0, m, s, a, tgt, inv_temp, softcap);
  });
}

void grad_in_place_f32(float* tile, int64_t rows, int64_t cols, int64_t ld, const int64_t* targets,
                       int64_t col0, const float* m, const float* logs, const float* g_lp,
                       const float* ent, const float* g_ent, float inv_temp, float softcap,
                       int nthreads) {
  parallel_rows(rows, cols, nthreads, [&](int64_t r0, int64_t r1) {
    grad_rows_f32(tile, ld, tile, ld, r0, r1, cols, targets, col0, m, logs, g_lp, ent, g_ent,
                  inv_temp, softcap);
  });
}

void grad_bf16(const uint16_t* tile, int64_t ld, float* out, int64_t ld_out, int64_t rows,
               int64_t cols, const int64_t* targets, int64_t col0, const float* m,
               const float* logs, const float* g_lp, const float* ent, const float* g_ent,
               float inv_temp, float softcap, int nthreads) {
  parallel_rows(rows, cols, nthreads, [&](int64_t r0, int64_t r1) {
    grad_rows_bf16(tile, ld, out, ld_out, r0, r1, cols, targets, col0, m, logs, g_lp, ent, g_ent,
                   inv_temp, softcap);
  });
}

const char* isa() {
#if AK_HAVE_CLONES
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "avx512";
  if (__builtin_cpu_supports("x86-64-v3")) return "avx2";
#endif
  return "scalar";
}

}  // namespace alignkit
