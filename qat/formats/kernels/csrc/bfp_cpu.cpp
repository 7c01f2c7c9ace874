// BFP fake quantisation on the CPU (qat.formats.kernels.cpu): one vectorised pass over whole
// blocks, equal bit for bit to qat.formats.bfp's reference (scale "max") for float32:
//   finite x only (non-finite values pass through and count as 0 in their block);
//   e = clamp(ceil(log2(max|x|)), lo, hi), lo for an all-zero block;
//   q = sign(x) * min(round_half_even(|x| * 2^-e * 2^M), 2^M - 1) * 2^(e - M)
// (a value that rounds to 0 keeps x's sign when x < 0, and -0.0 gives +0.0, as sign(-0.0) = 0).
//
// Built at run time by torch.utils.cpp_extension (qat/formats/kernels/cpu_build.py); the op
// is torch.ops.qat_cpu_formats.bfp_quantize.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "bfp_scale.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

using Vec = at::vec::Vectorized<float>;

struct Bfp {
  int64_t block, m_bits, e_lo, e_hi;
  float top, two_m;
};

inline void scales(float amax, const Bfp& f, float* up, float* down) {
  qat_cpu::bfp_scales(amax, f.m_bits, f.e_lo, f.e_hi, up, down);
}

// A block whose length is a multiple of the vector width.
void block_vec(const float* x, float* out, const Bfp& f) {
  const int64_t W = Vec::size();
  const Vec zero(0.f);
  Vec m = zero;
  for (int64_t i = 0; i < f.block; i += W) {
    const Vec v = Vec::loadu(x + i);
    const Vec finite = (v - v) == zero;  // all-ones lanes where v is finite
    m = at::vec::maximum(m, Vec::blendv(zero, v.abs(), finite));
  }
  const float amax =
      at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, m);
  float up, down;
  scales(amax, f, &up, &down);
  for (int64_t i = 0; i < f.block; i += W) {
    const Vec v = Vec::loadu(x + i);
    const Vec finite = (v - v) == zero;
    const Vec v0 = Vec::blendv(zero, v, finite);
    const Vec mag = at::vec::minimum((v0.abs() * Vec(up) * Vec(f.two_m)).round(), Vec(f.top));
    Vec q = mag * Vec(down);
    q = Vec::blendv(q, q.neg(), v0 < zero);
    Vec::blendv(v, q, finite).store(out + i);
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// One block of exactly 16 floats (one zmm register) with AVX512 intrinsics: block_vec's
// operations without at::vec's NaN-propagating max / min (no NaN reaches them here: non-finite
// lanes are zeroed first, and a NaN never comes out of |x0| * 2^-e * 2^M).
inline void block16_avx512(const float* x, float* out, const Bfp& f) {
  const __m512 v = _mm512_loadu_ps(x);
  const __m512 zero = _mm512_setzero_ps();
  const __mmask16 finite = _mm512_cmp_ps_mask(_mm512_sub_ps(v, v), zero, _CMP_EQ_OQ);
  const __m512 v0 = _mm512_maskz_mov_ps(finite, v);
  const __m512 a = _mm512_abs_ps(v0);
  const float amax = _mm512_reduce_max_ps(a);
  float up, down;
  scales(amax, f, &up, &down);
  __m512 mag = _mm512_mul_ps(_mm512_mul_ps(a, _mm512_set1_ps(up)), _mm512_set1_ps(f.two_m));
  mag = _mm512_roundscale_ps(mag, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  mag = _mm512_min_ps(mag, _mm512_set1_ps(f.top));
  __m512 q = _mm512_mul_ps(mag, _mm512_set1_ps(down));
  const __mmask16 neg = _mm512_cmp_ps_mask(v0, zero, _CMP_LT_OQ);
  q = _mm512_mask_xor_ps(q, neg, q, _mm512_set1_ps(-0.0f));  // -q where x0 < 0 (-0 too)
  _mm512_storeu_ps(out, _mm512_mask_blend_ps(finite, v, q));
}
#endif

// Any block length, element by element (the same operations).
void block_scalar(const float* x, float* out, const Bfp& f) {
  float amax = 0.f;
  for (int64_t i = 0; i < f.block; ++i)
    if (std::isfinite(x[i])) amax = std::max(amax, std::abs(x[i]));
  float up, down;
  scales(amax, f, &up, &down);
  for (int64_t i = 0; i < f.block; ++i) {
    const float v = x[i];
    if (!std::isfinite(v)) {
      out[i] = v;
      continue;
    }
    const float mag = std::min(std::nearbyint(std::abs(v) * up * f.two_m), f.top);
    const float q = mag * down;
    out[i] = v < 0.f ? -q : q;
  }
}

// blocks [n, B] float32 -> their BFP values.
at::Tensor bfp_quantize(const at::Tensor& blocks_, int64_t m_bits, int64_t e_lo, int64_t e_hi) {
  TORCH_CHECK(blocks_.device().is_cpu() && blocks_.scalar_type() == at::kFloat &&
                  blocks_.dim() == 2 && blocks_.size(1) > 0,
              "qat_cpu_formats.bfp_quantize: blocks must be a float32 CPU tensor [blocks, B], "
              "got ", blocks_.scalar_type(), " ", blocks_.sizes());
  TORCH_CHECK(m_bits >= 1 && m_bits <= 23 && e_lo <= e_hi && e_lo >= -127 && e_hi <= 128,
              "qat_cpu_formats.bfp_quantize: format out of range (m_bits ", m_bits,
              ", exponents [", e_lo, ", ", e_hi, "])");
  const at::Tensor blocks = blocks_.contiguous();
  const int64_t n = blocks.size(0), B = blocks.size(1);
  at::Tensor out = at::empty_like(blocks);
  const float two_m = qat_cpu::mantissa_steps(m_bits);
  const Bfp f{B, m_bits, e_lo, e_hi, two_m - 1.0f, two_m};
  const float* x = blocks.const_data_ptr<float>();
  float* o = out.data_ptr<float>();
  const bool vec = B % Vec::size() == 0;
  // about 32 K elements per task
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(B, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
#if defined(CPU_CAPABILITY_AVX512)
      if (B == 16) {
        block16_avx512(x + b * B, o + b * B, f);
        continue;
      }
#endif
      if (vec) {
        block_vec(x + b * B, o + b * B, f);
      } else {
        block_scalar(x + b * B, o + b * B, f);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(qat_cpu_formats, m) {
  m.def("bfp_quantize(Tensor blocks, int m_bits, int e_lo, int e_hi) -> Tensor");
}

TORCH_LIBRARY_IMPL(qat_cpu_formats, CPU, m) { m.impl("bfp_quantize", &bfp_quantize); }
