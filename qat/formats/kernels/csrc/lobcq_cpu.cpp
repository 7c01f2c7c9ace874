// LO-BCQ fake quantisation on the CPU (qat.formats.kernels.cpu_lobcq), equal bit for bit to
// qat.formats.lobcq's reference for float32 rows whose last dim is the blocking dim:
//   per array of L_A scalars (finite ones; NaN and +-inf pass through and count as 0):
//     e = ceil(log2(amax / 31)) (+1 where the division rounded down), clamped to [-127, 127]
//     (-127 where amax / 31 underflows to 0);
//     an all-zero array gives +0.0 everywhere;
//     y = clamp(x * 2^-e, -31, 31), bin = clamp(floor(2 y) + 62, 0, 124);
//   per block of L_b scalars: the codebook whose float32 error sum((y - T[bin][c])^2), added
//   left to right over the block's real scalars, is least (ties: the lowest index);
//   q = T[bin][choice] * 2^e, saturated at +-FLT_MAX.
// T is the reference's lookup table (nearest entry of each codebook for each bin), transposed
// so that one bin's entries in every codebook are one contiguous row: the codebooks are the
// vector lanes, and one scalar updates every codebook's error with a few vector ops.
//
// Built at run time by torch.utils.cpp_extension (qat/formats/kernels/cpu_build.py) with
// -ffp-contract=off: d * d + acc is never fused, as the reference computes it.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "bfp_scale.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

constexpr float kEntryMax = 31.f;
constexpr int64_t kMaxCodebooks = 256;

struct Lobcq {
  int64_t n, block_len, array_len, num_codebooks, nbins, lanes;  // lanes: codebooks, padded
  const float* table;                                            // [nbins][lanes]
};

// The reference's array_exponent: e with amax <= 31 * 2^e, clamped to [-127, 127].
inline int64_t array_exponent(float amax) {
  const float t = amax / kEntryMax;
  if (t == 0.f) return -127;  // amax below 31 * 2^-150: far below the range
  int64_t e = qat_cpu::ceil_log2(t);
  if (amax > kEntryMax * qat_cpu::pow2(e)) e += 1;  // the division may have rounded down
  return std::min<int64_t>(std::max<int64_t>(e, -127), 127);
}

inline int64_t bin_of(float y, int64_t nbins) {
  const float b = std::floor(2.f * y) + 2.f * kEntryMax;
  return static_cast<int64_t>(std::min(std::max(b, 0.f), static_cast<float>(nbins - 1)));
}

// The first codebook with the least error (errors are finite; padding lanes hold +inf).
inline int64_t first_min(const float* err, int64_t count) {
  int64_t best = 0;
  for (int64_t c = 1; c < count; ++c)
    if (err[c] < err[best]) best = c;
  return best;
}

// One block of `len` real scalars y[0..len) with bins b[..]: its codebook.
inline int64_t choose(const float* y, const int64_t* b, int64_t len, const Lobcq& f) {
  const int64_t W = Vec::size();
  const int64_t nv = f.lanes / W;
#if defined(CPU_CAPABILITY_AVX512)
  if (nv == 1) {  // up to 16 codebooks: one register of errors, a vector argmin
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < len; ++i) {
      const __m512 d = _mm512_sub_ps(_mm512_set1_ps(y[i]), _mm512_loadu_ps(f.table + b[i] * f.lanes));
      acc = _mm512_add_ps(acc, _mm512_mul_ps(d, d));
    }
    const float m = _mm512_reduce_min_ps(acc);
    const __mmask16 eq = _mm512_cmp_ps_mask(acc, _mm512_set1_ps(m), _CMP_EQ_OQ);
    return __builtin_ctz(static_cast<unsigned>(eq));  // the lowest lane of the minimum
  }
#endif
  Vec acc[kMaxCodebooks / 4];  // W >= 4 lanes on every ISA ATen vectorises for
  for (int64_t k = 0; k < nv; ++k) acc[k] = Vec(0.f);
  for (int64_t i = 0; i < len; ++i) {
    const Vec yv(y[i]);
    const float* row = f.table + b[i] * f.lanes;
    for (int64_t k = 0; k < nv; ++k) {
      const Vec d = yv - Vec::loadu(row + k * W);
      acc[k] = acc[k] + d * d;
    }
  }
  alignas(64) float err[kMaxCodebooks + 64];
  for (int64_t k = 0; k < nv; ++k) acc[k].store(err + k * W);
  return first_min(err, f.num_codebooks);
}

// One array: x[0..len) -> out[0..len).
void quantize_array(const float* x, float* out, int64_t len, const Lobcq& f) {
  float amax = 0.f;
  for (int64_t i = 0; i < len; ++i)
    if (std::isfinite(x[i])) amax = std::max(amax, std::abs(x[i]));
  if (amax == 0.f) {
    for (int64_t i = 0; i < len; ++i) out[i] = std::isfinite(x[i]) ? 0.f : x[i];
    return;
  }
  const int64_t e = array_exponent(amax);
  const float inv = qat_cpu::pow2(-e), scale = qat_cpu::pow2(e);
  float y[1024];
  int64_t b[1024];
  for (int64_t s = 0; s < len; s += f.block_len) {
    const int64_t m = std::min(f.block_len, len - s);  // real scalars of this block
    for (int64_t i = 0; i < m; ++i) {
      const float v = std::isfinite(x[s + i]) ? x[s + i] : 0.f;
      y[i] = std::min(std::max(v * inv, -kEntryMax), kEntryMax);
      b[i] = bin_of(y[i], f.nbins);
    }
    const int64_t c = choose(y, b, m, f);
    for (int64_t i = 0; i < m; ++i) {
      const float q = f.table[b[i] * f.lanes + c] * scale;
      out[s + i] = std::isfinite(x[s + i]) ? std::min(std::max(q, -FLT_MAX), FLT_MAX) : x[s + i];
    }
  }
}

#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kGroup = 8;  // blocks whose errors are summed side by side

// kGroup blocks of L_b scalars from y (offsets into the table in idx): each block's codebook.
// Eight independent sums hide the adds' latency; each is still its block's left-to-right sum.
inline void choose_group16(const float* y, const int32_t* idx, int64_t lb, const float* table,
                           int32_t* choice) {
  __m512 acc[kGroup];
  for (int64_t g = 0; g < kGroup; ++g) acc[g] = _mm512_setzero_ps();
  for (int64_t i = 0; i < lb; ++i) {
    for (int64_t g = 0; g < kGroup; ++g) {
      const int64_t k = g * lb + i;
      const __m512 d = _mm512_sub_ps(_mm512_set1_ps(y[k]), _mm512_loadu_ps(table + idx[k]));
      acc[g] = _mm512_add_ps(acc[g], _mm512_mul_ps(d, d));
    }
  }
  for (int64_t g = 0; g < kGroup; ++g) {
    const float m = _mm512_reduce_min_ps(acc[g]);
    const __mmask16 eq = _mm512_cmp_ps_mask(acc[g], _mm512_set1_ps(m), _CMP_EQ_OQ);
    choice[g] = __builtin_ctz(static_cast<unsigned>(eq));
  }
}

// A whole array (L_A a multiple of 16, at most 1024) with at most 16 codebooks (one register
// of errors): quantize_array's operations, 16 scalars at a time where they are per scalar.
void array16_avx512(const float* x, float* out, const Lobcq& f) {
  const int64_t L = f.array_len, lb = f.block_len, nb = L / lb;
  const __m512 zero = _mm512_setzero_ps();
  __m512 m = zero;
  for (int64_t i = 0; i < L; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    const __mmask16 fin = _mm512_cmp_ps_mask(_mm512_sub_ps(v, v), zero, _CMP_EQ_OQ);
    m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_maskz_mov_ps(fin, v)));
  }
  const float amax = _mm512_reduce_max_ps(m);
  if (amax == 0.f) {
    for (int64_t i = 0; i < L; i += 16) {
      const __m512 v = _mm512_loadu_ps(x + i);
      const __mmask16 fin = _mm512_cmp_ps_mask(_mm512_sub_ps(v, v), zero, _CMP_EQ_OQ);
      _mm512_storeu_ps(out + i, _mm512_mask_blend_ps(fin, v, zero));
    }
    return;
  }
  const int64_t e = array_exponent(amax);
  const __m512 inv = _mm512_set1_ps(qat_cpu::pow2(-e)), scale = _mm512_set1_ps(qat_cpu::pow2(e));
  const __m512 lo = _mm512_set1_ps(-kEntryMax), hi = _mm512_set1_ps(kEntryMax);
  const __m512 top = _mm512_set1_ps(static_cast<float>(f.nbins - 1));
  alignas(64) float y[1024];
  alignas(64) int32_t idx[1024];  // each scalar's table row: bin * 16
  for (int64_t i = 0; i < L; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    const __mmask16 fin = _mm512_cmp_ps_mask(_mm512_sub_ps(v, v), zero, _CMP_EQ_OQ);
    const __m512 yv = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_maskz_mov_ps(fin, v), inv), lo), hi);
    __m512 b = _mm512_roundscale_ps(_mm512_add_ps(yv, yv), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    b = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(b, _mm512_set1_ps(2.f * kEntryMax)), zero), top);
    _mm512_store_ps(y + i, yv);
    _mm512_store_si512(idx + i, _mm512_slli_epi32(_mm512_cvtps_epi32(b), 4));
  }
  alignas(64) int32_t choice[1024];
  int64_t j = 0;
  for (; j + kGroup <= nb; j += kGroup)
    choose_group16(y + j * lb, idx + j * lb, lb, f.table, choice + j);
  for (; j < nb; ++j) {
    int64_t b[1024];
    for (int64_t i = 0; i < lb; ++i) b[i] = idx[j * lb + i] / 16;
    choice[j] = static_cast<int32_t>(choose(y + j * lb, b, lb, f));
  }
  for (int64_t jb = 0; jb < nb; ++jb)
    for (int64_t i = 0; i < lb; ++i) idx[jb * lb + i] += choice[jb];
  const __m512 big = _mm512_set1_ps(FLT_MAX);
  for (int64_t i = 0; i < L; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    const __mmask16 fin = _mm512_cmp_ps_mask(_mm512_sub_ps(v, v), zero, _CMP_EQ_OQ);
    const __m512 entry = _mm512_i32gather_ps(_mm512_load_si512(idx + i), f.table, 4);
    __m512 q = _mm512_mul_ps(entry, scale);
    q = _mm512_min_ps(_mm512_max_ps(q, _mm512_sub_ps(zero, big)), big);
    _mm512_storeu_ps(out + i, _mm512_mask_blend_ps(fin, v, q));
  }
}
#endif

// rows [R, n] float32; lut_values [N_c, nbins] (the reference's build_luts values).
at::Tensor lobcq_quantize(const at::Tensor& rows_, const at::Tensor& lut_values, int64_t block_len,
                          int64_t array_len) {
  TORCH_CHECK(rows_.scalar_type() == at::kFloat && rows_.dim() == 2,
              "qat_cpu_lobcq.lobcq_quantize: float32 [rows, n]");
  TORCH_CHECK(lut_values.scalar_type() == at::kFloat && lut_values.dim() == 2 &&
                  lut_values.size(0) >= 1 && lut_values.size(0) <= kMaxCodebooks,
              "qat_cpu_lobcq.lobcq_quantize: lut_values float32 [1..256 codebooks, bins]");
  TORCH_CHECK(block_len >= 1 && block_len <= 1024 && array_len % block_len == 0,
              "qat_cpu_lobcq.lobcq_quantize: 1 <= block_len <= 1024 dividing array_len");
  const at::Tensor rows = rows_.contiguous();
  const int64_t R = rows.size(0), n = rows.size(1);
  const int64_t nc = lut_values.size(0), nbins = lut_values.size(1);
  const int64_t W = Vec::size();
  const int64_t lanes = (nc + W - 1) / W * W;
  // transposed, padded with +inf lanes that never win
  std::vector<float> table(nbins * lanes, std::numeric_limits<float>::infinity());
  const at::Tensor lut = lut_values.contiguous();
  const float* lv = lut.const_data_ptr<float>();
  for (int64_t c = 0; c < nc; ++c)
    for (int64_t k = 0; k < nbins; ++k) table[k * lanes + c] = lv[c * nbins + k];
  const Lobcq f{n, block_len, array_len, nc, nbins, lanes, table.data()};
  at::Tensor out = at::empty_like(rows);
  const float* x = rows.const_data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t arrays = (n + array_len - 1) / array_len;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / array_len);  // ~16 K scalars
#if defined(CPU_CAPABILITY_AVX512)
  const bool fast = lanes == 16 && array_len % 16 == 0 && array_len <= 1024;
#endif
  at::parallel_for(0, R * arrays, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = t / arrays, a = t % arrays;
      const int64_t start = r * n + a * array_len, len = std::min(array_len, n - a * array_len);
#if defined(CPU_CAPABILITY_AVX512)
      if (fast && len == array_len) {
        array16_avx512(x + start, o + start, f);
        continue;
      }
#endif
      quantize_array(x + start, o + start, len, f);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(qat_cpu_lobcq, m) {
  m.def("lobcq_quantize(Tensor rows, Tensor lut_values, int block_len, int array_len) -> Tensor");
}

TORCH_LIBRARY_IMPL(qat_cpu_lobcq, CPU, m) { m.impl("lobcq_quantize", &lobcq_quantize); }
