// Standalone test of the raw kernels (no Python, no torch), for sanitizer runs:
//   make sanitize   (AddressSanitizer + UndefinedBehaviorSanitizer; runs in CI)
// Checks fold and grad against a double-precision scalar reference on odd sizes, several vocab
// blocks, softcap/temperature, entropy, fp32 and bf16 tiles, 1 and 3 threads.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "logprob_kernels.h"

using namespace alignkit;

static uint16_t to_bf16(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  b += 0x7FFF + ((b >> 16) & 1);  // round to nearest even
  return static_cast<uint16_t>(b >> 16);
}
static float from_bf16(uint16_t h) {
  uint32_t b = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

static int failures = 0;
static void expect(bool ok, const char* what, int64_t r, double got, double want) {
  if (!ok) {
    if (failures < 20) std::printf("FAIL %s row %lld: got %.9g want %.9g\n", what, (long long)r, got, want);
    ++failures;
  }
}

static void run_case(int64_t rows, int64_t V, int64_t block, float temp, float cap, bool bf16,
                     int nthreads) {
  std::mt19937 gen(static_cast<unsigned>(rows * 7919 + V));
  std::normal_distribution<float> nd(0.0f, 3.0f);
  const int64_t ld = V + 3;  // padded rows: the kernels must honour the stride
  std::vector<float> x(rows * ld);
  for (auto& v : x) v = nd(gen);
  std::vector<uint16_t> xb(rows * ld);
  if (bf16) {
    for (size_t i = 0; i < x.size(); ++i) { xb[i] = to_bf16(x[i]); x[i] = from_bf16(xb[i]); }
  }
  std::vector<int64_t> tgt(rows);
  for (int64_t r = 0; r < rows; ++r) tgt[r] = static_cast<int64_t>(gen() % V);
  const float inv_t = 1.0f / temp;

  // reference in double
  std::vector<double> lse(rows), ent(rows), zt(rows);
  std::vector<double> z(rows * V);
  for (int64_t r = 0; r < rows; ++r) {
    double mx = -1e300;
    for (int64_t j = 0; j < V; ++j) {
      double v = x[r * ld + j];
      if (cap > 0) v = cap * std::tanh(v / cap);
      v *= inv_t;
      z[r * V + j] = v;
      mx = std::max(mx, v);
    }
    double s = 0, a = 0;
    for (int64_t j = 0; j < V; ++j) { double e = std::exp(z[r * V + j] - mx); s += e; a += e * z[r * V + j]; }
    lse[r] = mx + std::log(s);
    ent[r] = lse[r] - a / s;
    zt[r] = z[r * V + tgt[r]];
  }

  // fold, block by block
  std::vector<float> m(rows, -INFINITY), s(rows, 0.0f), a(rows, 0.0f), t(rows, 0.0f);
  for (int64_t c0 = 0; c0 < V; c0 += block) {
    const int64_t cols = std::min(block, V - c0);
    if (bf16)
      fold_bf16(xb.data() + c0, rows, cols, ld, tgt.data(), c0, m.data(), s.data(), a.data(), t.data(), inv_t, cap, nthreads);
    else
      fold_f32(x.data() + c0, rows, cols, ld, tgt.data(), c0, m.data(), s.data(), a.data(), t.data(), inv_t, cap, nthreads);
  }
  std::vector<float> logs(rows), entf(rows), g(rows), ge(rows);
  for (int64_t r = 0; r < rows; ++r) {
    logs[r] = std::log(s[r]);
    entf[r] = logs[r] - a[r] / s[r];
    const double lp = (t[r] - m[r]) - logs[r];
    expect(std::fabs(lp - (zt[r] - lse[r])) < 2e-5 * (1 + std::fabs(zt[r] - lse[r])), "logprob", r, lp, zt[r] - lse[r]);
    expect(std::fabs(entf[r] - ent[r]) < 2e-5 * (1 + ent[r]), "entropy", r, entf[r], ent[r]);
    g[r] = 0.5f + 0.1f * static_cast<float>(r % 7);
    ge[r] = -0.3f + 0.05f * static_cast<float>(r % 5);
  }

  // grad, block by block
  std::vector<float> out(rows * ld, 0.0f);
  for (int64_t c0 = 0; c0 < V; c0 += block) {
    const int64_t cols = std::min(block, V - c0);
    if (bf16) {
      grad_bf16(xb.data() + c0, ld, out.data() + c0, ld, rows, cols, tgt.data(), c0, m.data(),
                logs.data(), g.data(), entf.data(), ge.data(), inv_t, cap, nthreads);
    } else {
      std::memcpy(out.data(), x.data(), sizeof(float) * x.size());
    }
  }
  if (!bf16) {
    for (int64_t c0 = 0; c0 < V; c0 += block) {
      const int64_t cols = std::min(block, V - c0);
      grad_in_place_f32(out.data() + c0, rows, cols, ld, tgt.data(), c0, m.data(), logs.data(),
                        g.data(), entf.data(), ge.data(), inv_t, cap, nthreads);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < V; ++j) {
      const double zz = z[r * V + j];
      const double p = std::exp(zz - lse[r]);
      double d = g[r] * ((j == tgt[r]) - p) - ge[r] * p * (zz - lse[r] + ent[r]);
      double dzdx = inv_t;
      if (cap > 0) { double th = std::tanh(x[r * ld + j] / cap); dzdx = (1 - th * th) * inv_t; }
      d *= dzdx;
      expect(std::fabs(out[r * ld + j] - d) < 1e-5 * (1 + std::fabs(d)), "grad", r, out[r * ld + j], d);
    }
  }
}

int main() {
  std::printf("isa: %s\n", isa());
  int cases = 0;
  for (int nt : {1, 3})
    for (bool bf16 : {false, true})
      for (float cap : {0.0f, 4.0f}) {
        run_case(37, 1000, 1000, 1.0f, cap, bf16, nt);
        run_case(13, 4099, 512, 0.7f, cap, bf16, nt);
        run_case(5, 300, 77, 1.3f, cap, bf16, nt);
        cases += 3;
      }
  std::printf("%d passed, %d failed\n", failures ? 0 : cases, failures ? cases : 0);
  return failures ? 1 : 0;
}
