// The shared exponent of a BFP block (scale "max"), exactly as qat.formats.bfp computes it:
// e = clamp(ceil(log2(amax)), lo, hi), lo for an all-zero block, and the two power-of-two
// factors of the quantiser, 2^-e (times 2^M separately: 2^(M - e) alone could overflow float32
// for e = -127) and 2^(e - M). Shared by the CPU kernels (bfp_cpu.cpp, the attention kernel).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace qat_cpu {

// ceil(log2(x)) for x > 0, exactly (qat.formats.base.ceil_log2): from the bits of a normal
// float (its exponent, plus one unless the mantissa is 0), frexp for a subnormal.
inline int64_t ceil_log2(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const int64_t biased = (bits >> 23) & 0xff;
  if (biased == 0) {
    int e;
    const float m = std::frexp(x, &e);
    return m == 0.5f ? e - 1 : e;
  }
  return biased - 127 + ((bits & 0x7fffff) != 0 ? 1 : 0);
}

// 2^k exactly (a subnormal power of two through ldexp).
inline float pow2(int64_t k) {
  if (k < -126 || k > 127) return std::ldexp(1.0f, static_cast<int>(k));
  const uint32_t bits = static_cast<uint32_t>(k + 127) << 23;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

// 2^M as a float: the number of mantissa steps of M bits (the largest magnitude is 2^M - 1),
// exact for M <= 24; a 64-bit shift, so no M a format allows overflows it.
inline float mantissa_steps(int64_t m_bits) {
  return static_cast<float>(int64_t{1} << m_bits);
}

// *up = 2^-e and *down = 2^(e - m_bits) for a block whose largest magnitude is amax.
inline void bfp_scales(float amax, int64_t m_bits, int64_t lo, int64_t hi, float* up,
                       float* down) {
  int64_t e = amax > 0.f ? ceil_log2(amax) : lo;
  e = std::min(std::max(e, lo), hi);
  *up = pow2(-e);
  *down = pow2(e - m_bits);
}

}  // namespace qat_cpu
