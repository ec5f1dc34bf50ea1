// Fused elementwise kernels for the CPU path of alignkit's log-prob op.
//
// The GEMMs (logits tile = h_chunk @ W_blockᵀ, G @ W, Gᵀ @ h) go through MKL via torch. Everything
// between them — the online log-sum-exp, the target gather, the entropy statistics and, in backward,
// g·(onehot − softmax) — is done here in one read (forward) or one read-modify-write (backward) of a
// cache-resident fp32 tile, instead of the 4–6 full passes that separate torch ops take.
//
// No torch, no autograd: raw pointers, sizes and strides. The Python launcher in alignkit/ops checks
// dtypes, shapes and contiguity before calling.
//
// Symbols (per tile row r, column j of the tile, global vocab id v = col0 + j):
//   x      raw logit (h·W_vᵀ + b_v), fp32 (or bf16 for the *_bf16 variant)
//   z      transformed logit: z = softcap·tanh(x/softcap) (if softcap > 0), then z *= inv_temp
//   m, s   running max of z and running Σ exp(z − m)
//   a      running Σ exp(z − m)·(z − m)   (entropy: H = log s − a/s, no cancellation)
//   lse    m + log s
#pragma once
#include <cstdint>

namespace alignkit {

// Folds a tile into the per-row online statistics. Rows whose target is in [col0, col0+cols) get
// tgt[r] = z at the target. a may be null (no entropy).
void fold_f32(const float* tile, int64_t rows, int64_t cols, int64_t ld, const int64_t* targets,
              int64_t col0, float* m, float* s, float* a, float* tgt, float inv_temp, float softcap,
              int nthreads);
void fold_bf16(const uint16_t* tile, int64_t rows, int64_t cols, int64_t ld, const int64_t* targets,
               int64_t col0, float* m, float* s, float* a, float* tgt, float inv_temp, float softcap,
               int nthreads);

// Turns a raw-logit tile into dL/dx in place (lse is passed as m + logs, kept apart so that
// z − lse = (z − m) − logs loses nothing when the logits are large):
//   p = exp(z − lse);  dz = g_lp·(onehot − p) − g_ent·p·(z − lse + ent);  dx = dz·dz/dx
// ent and g_ent may be null (no entropy term).
void grad_in_place_f32(float* tile, int64_t rows, int64_t cols, int64_t ld, const int64_t* targets,
                       int64_t col0, const float* m, const float* logs, const float* g_lp,
                       const float* ent,
                       const float* g_ent, float inv_temp, float softcap, int nthreads);

// The same, reading a bf16 tile and writing the fp32 gradient to `out` (row stride ld_out).
void grad_bf16(const uint16_t* tile, int64_t ld, float* out, int64_t ld_out, int64_t rows,
               int64_t cols, const int64_t* targets, int64_t col0, const float* m,
               const float* logs, const float* g_lp, const float* ent, const float* g_ent, float inv_temp,
               float softcap, int nthreads);

// Which instruction set the runtime dispatch picked ("avx512", "avx2" or "scalar").
const char* isa();

}  // namespace alignkit
