// Quantised attention on the CPU in linear memory (qat.quant.attention.cpu): the block path of
// qat/quant/attention/block.py fused per (batch, head, block of query rows).
//
// A task holds one tile of R query rows of one head and its whole rows of scores (R x keys,
// in cache), so the softmax and the P quantiser see exactly the rows the eager path gives
// them; QK^T and the products with V, dO run as single-threaded ATen GEMMs on the tile, the
// pointwise work (scale, mask, softmax, BFP quantiser of P, softmax backward) in vectorised
// passes over rows that stay in cache. Every GEMM has the shape the PyTorch block path gives
// the same sum (R rows, the last tile reaching back; each tile's keys; dK and dV as one GEMM per
// tile then an add), so the results are that path's bit for bit. Only float32, BFP (max rule)
// or float P.
//
// Built at run time by torch.utils.cpp_extension with the ISA flags of the machine (see
// qat/quant/attention/cpu.py); the ops are registered as torch.ops.qat_cpu.*.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "bfp_scale.h"  // qat/formats/kernels/csrc

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <cmath>
#include <limits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

// P blocks of at most this many keys: one block is staged on the stack
// (qat.quant.attention.cpu.MAX_BLOCK).
constexpr int64_t kMaxBlock = 256;

// The P format: BFP with m_bits mantissa bits, exponents clamped to [e_lo, e_hi], blocks of
// `block` keys along the row; block == 0 leaves P in float.
struct PFormat {
  int64_t block;
  int64_t m_bits;
  int64_t e_lo;
  int64_t e_hi;
};

// One row of P, block by block: P = e * inv (e = exp(s - mx) first when `exp_of` is set), and
// its BFP (max rule) as qat.formats.bfp for P >= 0 (so no signs): per block
// e_b = clamp(ceil(log2(max P)), lo, hi) (lo for an all-zero block), then
// min(round_half_even(P * 2^-e_b * 2^M), 2^M - 1) * 2^(e_b - M). Writes P to p (if not null;
// may alias e) and Q(P) to qp (may alias e); a ragged last block is quantised as if
// zero-padded.
void probs_quantize_row(const float* e, bool exp_of, float mx, float inv, float* p, float* qp,
                        int64_t n, const PFormat& f) {
  const float two_m = qat_cpu::mantissa_steps(f.m_bits);
  const float top = two_m - 1.0f;
  const int64_t W = Vec::size();
  const bool vec_blocks = f.block % W == 0;
  float tmp[kMaxBlock];  // one block of P (checked_format: block <= kMaxBlock)
  for (int64_t b0 = 0; b0 < n; b0 += f.block) {
    const int64_t len = std::min(f.block, n - b0);
    const bool whole = vec_blocks && len == f.block;
    float amax = 0.f;
    if (whole) {
      Vec m(0.f);
      for (int64_t i = 0; i < len; i += W) {
        Vec x = Vec::loadu(e + b0 + i);
        if (exp_of) x = (x - Vec(mx)).exp();
        Vec v = x * Vec(inv);
        v.store(tmp + i);
        m = at::vec::maximum(m, v);
      }
      amax = at::vec::vec_reduce_all<float>(
          [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, m);
    } else {
      for (int64_t i = 0; i < len; i += W) {
        const int64_t c = std::min(W, len - i);
        Vec x = Vec::loadu(e + b0 + i, c);
        if (exp_of) x = (x - Vec(mx)).exp();
        (x * Vec(inv)).store(tmp + i, c);
      }
      for (int64_t i = 0; i < len; ++i) amax = std::max(amax, tmp[i]);
    }
    float up, down;
    qat_cpu::bfp_scales(amax, f.m_bits, f.e_lo, f.e_hi, &up, &down);
    if (p != nullptr) std::copy(tmp, tmp + len, p + b0);
    if (whole) {
      for (int64_t i = 0; i < len; i += W) {
        Vec mag = (Vec::loadu(tmp + i) * Vec(up) * Vec(two_m)).round();
        (at::vec::minimum(mag, Vec(top)) * Vec(down)).store(qp + b0 + i);
      }
    } else {
      for (int64_t i = 0; i < len; ++i) {
        const float mag = std::nearbyint(tmp[i] * up * two_m);
        qp[b0 + i] = std::min(mag, top) * down;
      }
    }
  }
}

// exp(s - max) into e and its sum, lane by lane in the order of ATen's vec::reduce_all (so the
// sum is the one ATen's softmax takes of the same values).
float exp_sum_row(const float* s, float* e, int64_t n, float mx) {
  const int64_t W = Vec::size();
  if (n < W) {
    Vec x = (Vec::loadu(s, n) - Vec(mx)).exp();
    x.store(e, n);
    return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; },
                                          Vec::loadu(e, n), n);
  }
  Vec acc = (Vec::loadu(s) - Vec(mx)).exp();
  acc.store(e);
  int64_t d = W;
  for (; d < n - (n % W); d += W) {
    Vec x = (Vec::loadu(s + d) - Vec(mx)).exp();
    x.store(e + d);
    acc = acc + x;
  }
  if (n - d > 0) {
    Vec x = (Vec::loadu(s + d, n - d) - Vec(mx)).exp();
    x.store(e + d, n - d);
    acc = Vec::set(acc, acc + Vec::loadu(e + d, n - d), n - d);
  }
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
}

// Scale and mask the scores row s[0:n) in place: scores * scaling, then a bool mask's masked
// keys -> float32 lowest (masked_fill) or a float mask added. Returns whether the row sees a
// key (always, but for a bool mask that hides every key).
bool mask_row(float* s, int64_t n, float scaling, const bool* mb, const float* mf, int64_t kstride) {
  const float lowest = std::numeric_limits<float>::lowest();
  int64_t plain = n;  // keys [0, plain) are only scaled
  if (mb != nullptr && kstride == 1) {
    // a causal row sees a prefix: scale it in one vector pass, select only from its end
    const void* z = std::memchr(mb, 0, n);
    plain = z == nullptr ? n : static_cast<const bool*>(z) - mb;
  } else if (mb != nullptr) {
    plain = 0;
  }
  if (mf != nullptr && kstride == 1) {
    at::vec::map2([scaling](Vec x, Vec m) { return x * Vec(scaling) + m; }, s, s, mf, n);
    return true;
  }
  if (mf != nullptr) {
    for (int64_t j = 0; j < n; ++j) s[j] = s[j] * scaling + mf[j * kstride];
    return true;
  }
  if (scaling != 1.0f && plain > 0)
    at::vec::map([scaling](Vec x) { return x * Vec(scaling); }, s, s, plain);
  if (mb == nullptr) return true;
  bool any = plain > 0;
  for (int64_t j = plain; j < n; ++j) {
    const bool keep = mb[j * kstride];
    s[j] = keep ? s[j] * scaling : lowest;
    any |= keep;
  }
  return any;
}

float row_max(const float* s, int64_t n) {
  return at::vec::reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, s,
                                    n);
}

struct Mask {
  at::Tensor t;  // [B, H, Lq, Lk] (broadcast dims stride 0) or undefined
  bool is_bool = false;
  int64_t st[4] = {0, 0, 0, 0};
  explicit Mask(const c10::optional<at::Tensor>& m) {
    if (m.has_value() && m->defined()) {
      t = *m;
      is_bool = t.scalar_type() == at::kBool;
      for (int d = 0; d < 4; ++d) st[d] = t.stride(d);
    }
  }
  bool defined() const { return t.defined(); }
  int64_t kstride() const { return defined() ? st[3] : 1; }
  // row pointers of mask[b, h, i, :]
  const bool* brow(int64_t b, int64_t h, int64_t i) const {
    return is_bool ? t.const_data_ptr<bool>() + b * st[0] + h * st[1] + i * st[2] : nullptr;
  }
  const float* frow(int64_t b, int64_t h, int64_t i) const {
    return (defined() && !is_bool)
               ? t.const_data_ptr<float>() + b * st[0] + h * st[1] + i * st[2]
               : nullptr;
  }
};

// Q(P) of rows [r0, r0 + rows) of head (b, h) against keys [0, ks), in place of their scores
// s; stats (2 per row) get each row's max and 1 / sum for the backward.
void forward_rows(float* s, int64_t rows, int64_t ks, int64_t r0, int64_t b, int64_t h,
                  float scaling, const Mask& mask, const PFormat& f, float* stats) {
  for (int64_t i = 0; i < rows; ++i) {
    float* si = s + i * ks;
    mask_row(si, ks, scaling, mask.brow(b, h, r0 + i), mask.frow(b, h, r0 + i), mask.kstride());
    const float mx = row_max(si, ks);
    const float inv = 1.0f / exp_sum_row(si, si, ks, mx);
    stats[2 * i] = mx;
    stats[2 * i + 1] = inv;
    if (f.block > 0) {
      probs_quantize_row(si, false, mx, inv, nullptr, si, ks, f);
    } else {
      at::vec::map([inv](Vec x) { return x * Vec(inv); }, si, si, ks);
    }
  }
}

// The backward's P (in place of the scores s) and Q(P) (into qp; P itself when P stays float)
// from the forward's row stats: exp(s - max) * inv gives the forward's values bit for bit.
// seen[i]: whether row i sees a key.
void backward_rows(float* s, float* qp, int64_t rows, int64_t ks, int64_t r0, int64_t b,
                   int64_t h, float scaling, const Mask& mask, const PFormat& f,
                   const float* stats, bool* seen) {
  for (int64_t i = 0; i < rows; ++i) {
    float* si = s + i * ks;
    seen[i] = mask_row(si, ks, scaling, mask.brow(b, h, r0 + i), mask.frow(b, h, r0 + i),
                       mask.kstride());
    const float mx = stats[2 * i], inv = stats[2 * i + 1];
    if (f.block > 0) {
      probs_quantize_row(si, true, mx, inv, si, qp + i * ks, ks, f);
    } else {
      at::vec::map([mx, inv](Vec x) { return (x - Vec(mx)).exp() * Vec(inv); }, si, si, ks);
    }
  }
}

at::Tensor as_matrix(at::Tensor& buf, int64_t rows, int64_t cols) {
  return buf.narrow(0, 0, rows * cols).view({rows, cols});
}

// Block blk of `rows` query rows (qat.quant.attention.block.spans): it owns rows
// [first + off, first + n) and computes rows [first, first + n): the last block reaches back
// into the one before so that every block's GEMMs have `rows` rows (all Lq when Lq < rows).
struct Span {
  int64_t first, off, n;
};

Span span(int64_t blk, int64_t rows, int64_t Lq) {
  const int64_t start = blk * rows, stop = std::min(start + rows, Lq);
  const int64_t first = std::max<int64_t>(0, stop - rows);
  return {first, start - first, stop - first};
}

// The key stops (one per block of query rows, each in [1, Lk]) as a contiguous tensor.
at::Tensor checked_stops(const at::Tensor& stops_, int64_t nblocks, int64_t Lk) {
  TORCH_CHECK(stops_.scalar_type() == at::kLong && stops_.dim() == 1,
              "qat_cpu attention: stops must be int64 [query blocks], got ", stops_.scalar_type(),
              " of ", stops_.dim(), " dims");
  const at::Tensor stops = stops_.contiguous();
  TORCH_CHECK(stops.numel() == nblocks, "qat_cpu attention: ", stops.numel(),
              " key stops for ", nblocks, " query blocks");
  const int64_t* stop = stops.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < nblocks; ++i)
    TORCH_CHECK(stop[i] > 0 && stop[i] <= Lk, "qat_cpu attention: key stop ", stop[i],
                " out of range [1, ", Lk, "]");
  return stops;
}

// A float32 CPU tensor of 4 dims (what: its name in the message).
void check_4d(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 4,
              "qat_cpu attention: ", what, " must be a float32 CPU tensor [batch, heads, len, dim], "
              "got ", t.scalar_type(), " on ", t.device(), " with ", t.dim(), " dims");
}

// q [B, H, Lq, D], k [B, H, Lk, D], v [B, H, Lk, Dv], the mask [B, H, Lq, Lk] (bool or
// float32; broadcast dims may have stride 0), rows per block and the P format.
void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const c10::optional<at::Tensor>& mask, int64_t rows, const PFormat& f) {
  check_4d(q, "q");
  check_4d(k, "k");
  check_4d(v, "v");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "qat_cpu attention: k ", k.sizes(), " does not match q ", q.sizes());
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == k.size(2),
              "qat_cpu attention: v ", v.sizes(), " does not match k ", k.sizes());
  TORCH_CHECK(k.size(2) > 0, "qat_cpu attention: no keys");
  if (mask.has_value() && mask->defined()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == at::kFloat,
                "qat_cpu attention: the mask must be bool or float32, got ", m.scalar_type());
    TORCH_CHECK(m.device().is_cpu() && m.dim() == 4 && m.size(0) == q.size(0) &&
                    m.size(1) == q.size(1) && m.size(2) == q.size(2) && m.size(3) == k.size(2),
                "qat_cpu attention: the mask must be [batch, heads, q_len, k_len] = [",
                q.size(0), ", ", q.size(1), ", ", q.size(2), ", ", k.size(2), "], got ",
                m.sizes());
  }
  TORCH_CHECK(rows > 0, "qat_cpu attention: rows must be > 0, got ", rows);
  TORCH_CHECK(f.block >= 0 && f.block <= kMaxBlock, "qat_cpu attention: P block ", f.block,
              " out of range [0, ", kMaxBlock, "] (0: float P)");
  TORCH_CHECK(f.block == 0 || (f.m_bits >= 1 && f.m_bits <= 23 && f.e_lo <= f.e_hi &&
                               f.e_lo >= -127 && f.e_hi <= 128),
              "qat_cpu attention: P format out of range (m_bits ", f.m_bits, ", exponents [",
              f.e_lo, ", ", f.e_hi, "])");
}

// out [B, H, Lq, Dv] = Q(softmax(q k^T * scaling + mask)) v, per block of `rows` query rows
// (stops[i]: keys computed by query block i), and each row's softmax max and 1 / sum
// ([B, H, Lq, 2], for the backward).
std::vector<at::Tensor> forward(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                   const c10::optional<at::Tensor>& mask_, double scaling_,
                   const at::Tensor& stops_, int64_t rows, int64_t block, int64_t m_bits,
                   int64_t e_lo, int64_t e_hi) {
  const PFormat f{block, m_bits, e_lo, e_hi};
  check_inputs(q_, k_, v_, mask_, rows, f);
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2);
  const int64_t Lk = k.size(2), Dv = v.size(3);
  const int64_t nblocks = (Lq + rows - 1) / rows;
  const Mask mask(mask_);
  const float scaling = static_cast<float>(scaling_);
  const at::Tensor stops = checked_stops(stops_, nblocks, Lk);
  const int64_t* stop = stops.const_data_ptr<int64_t>();
  at::Tensor out = at::empty({B, H, Lq, Dv}, q.options());
  at::Tensor stats = at::empty({B, H, Lq, 2}, q.options());
  float* st = stats.data_ptr<float>();
  at::parallel_for(0, B * H * nblocks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor buf = at::empty({rows * Lk}, q.options());
    at::Tensor obuf = at::empty({rows * Dv}, q.options());
    std::vector<float> row_stats(2 * rows);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / nblocks, blk = t % nblocks;
      const int64_t b = bh / H, h = bh % H;
      const Span sp = span(blk, rows, Lq);
      const int64_t ks = stop[blk];
      at::Tensor qb = q[b][h].narrow(0, sp.first, sp.n);
      at::Tensor s = as_matrix(buf, sp.n, ks);
      at::mm_out(s, qb, k[b][h].narrow(0, 0, ks).t());
      forward_rows(s.data_ptr<float>(), sp.n, ks, sp.first, b, h, scaling, mask, f,
                   row_stats.data());
      at::Tensor ob = as_matrix(obuf, sp.n, Dv);
      at::mm_out(ob, s, v[b][h].narrow(0, 0, ks));
      // only the rows this block owns: the ones before belong to (and are written by) the last
      out[b][h].narrow(0, sp.first + sp.off, sp.n - sp.off).copy_(ob.narrow(0, sp.off, sp.n - sp.off));
      std::copy(row_stats.begin() + 2 * sp.off, row_stats.begin() + 2 * sp.n,
                st + 2 * (bh * Lq + sp.first + sp.off));
    }
  });
  return {out, stats};
}

// Gradients of forward() for q, k, v: each block recomputes P and Q(P); the quantiser is
// straight-through, so dS = P * (dP - rowsum(dP * P)) (then zero where a bool mask masks, times
// scaling), dP = dO V^T, dV = Q(P)^T dO, dQ = dS K, dK = dS^T Q. Parallel over heads (the
// blocks of a head accumulate into its dK, dV).
std::vector<at::Tensor> backward(const at::Tensor& grad_out_, const at::Tensor& q_,
                                 const at::Tensor& k_, const at::Tensor& v_,
                                 const c10::optional<at::Tensor>& mask_,
                                 const at::Tensor& stats_, double scaling_,
                                 const at::Tensor& stops_, int64_t rows, int64_t block,
                                 int64_t m_bits, int64_t e_lo, int64_t e_hi) {
  const PFormat f{block, m_bits, e_lo, e_hi};
  check_inputs(q_, k_, v_, mask_, rows, f);
  TORCH_CHECK(grad_out_.dim() == 4 && grad_out_.size(0) == q_.size(0) &&
                  grad_out_.size(1) == q_.size(1) && grad_out_.size(2) == q_.size(2) &&
                  grad_out_.size(3) == v_.size(3),
              "qat_cpu attention: grad_out ", grad_out_.sizes(), " is not the output's shape");
  TORCH_CHECK(stats_.scalar_type() == at::kFloat && stats_.dim() == 4 &&
                  stats_.size(0) == q_.size(0) && stats_.size(1) == q_.size(1) &&
                  stats_.size(2) == q_.size(2) && stats_.size(3) == 2,
              "qat_cpu attention: stats must be the forward's float32 [batch, heads, q_len, 2]");
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const at::Tensor go = grad_out_.contiguous().to(at::kFloat);
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2);
  const int64_t Lk = k.size(2), D = q.size(3), Dv = v.size(3);
  const int64_t nblocks = (Lq + rows - 1) / rows;
  const Mask mask(mask_);
  const float scaling = static_cast<float>(scaling_);
  const at::Tensor stops = checked_stops(stops_, nblocks, Lk);
  const int64_t* stop = stops.const_data_ptr<int64_t>();
  const at::Tensor stats = stats_.contiguous();
  const float* st = stats.const_data_ptr<float>();
  at::Tensor gq = at::empty_like(q), gk = at::zeros_like(k), gv = at::zeros_like(v);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    at::Tensor pbuf = at::empty({rows * Lk}, q.options());
    at::Tensor qpbuf = f.block > 0 ? at::empty({rows * Lk}, q.options()) : pbuf;
    at::Tensor dpbuf = at::empty({rows * Lk}, q.options());
    // a tile's share of dK and dV, added after: one GEMM then one add per element, as the
    // PyTorch block path takes it (not a GEMM that accumulates into dK, dV itself)
    at::Tensor addbuf = at::empty({std::max(Lk, rows) * std::max(D, Dv)}, q.options());
    std::vector<char> seen_buf(rows);
    bool* seen = reinterpret_cast<bool*>(seen_buf.data());
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      for (int64_t blk = 0; blk < nblocks; ++blk) {
        const Span sp = span(blk, rows, Lq);
        const int64_t n = sp.n, ks = stop[blk];
        at::Tensor qb = q[b][h].narrow(0, sp.first, n);
        at::Tensor kb = k[b][h].narrow(0, 0, ks), vb = v[b][h].narrow(0, 0, ks);
        at::Tensor gob = go[b][h].narrow(0, sp.first, n);
        at::Tensor p = as_matrix(pbuf, n, ks), qp = as_matrix(qpbuf, n, ks);
        at::Tensor dp = as_matrix(dpbuf, n, ks);
        at::mm_out(p, qb, kb.t());
        float* pp = p.data_ptr<float>();
        backward_rows(pp, qp.data_ptr<float>(), n, ks, sp.first, b, h, scaling, mask, f,
                      st + 2 * (bh * Lq + sp.first), seen);
        at::mm_out(dp, gob, vb.t());
        // rows before `off` belong to the block before: no share in dV, dK (zero rows keep
        // the GEMMs' shapes, and so their sums, those of every other block)
        if (sp.off > 0) qp.narrow(0, 0, sp.off).zero_();
        at::Tensor gv_t = as_matrix(addbuf, ks, Dv);
        at::mm_out(gv_t, qp.t(), gob);
        gv[b][h].narrow(0, 0, ks).add_(gv_t);
        float* dpp = dp.data_ptr<float>();
        for (int64_t i = 0; i < n; ++i) {
          float* dpi = dpp + i * ks;
          const float* pi = pp + i * ks;
          // as ATen's softmax backward: p * (g - sum(g * p)), times scaling (the mul's
          // backward); a row a bool mask hides entirely gets none (masked_fill's backward;
          // elsewhere the masked P is 0, so is its dS)
          if (!seen[i]) {
            std::fill(dpi, dpi + ks, 0.f);
            continue;
          }
          const float dot = at::vec::map2_reduce_all<float>(
              [](Vec a, Vec b) { return a * b; }, [](Vec a, Vec b) { return a + b; }, dpi, pi,
              ks);
          if (scaling != 1.0f) {
            at::vec::map2([dot, scaling](Vec g, Vec pv) { return pv * (g - Vec(dot)) * Vec(scaling); },
                          dpi, dpi, pi, ks);
          } else {
            at::vec::map2([dot](Vec g, Vec pv) { return pv * (g - Vec(dot)); }, dpi, dpi, pi, ks);
          }
        }
        at::Tensor gq_t = as_matrix(addbuf, n, D);
        at::mm_out(gq_t, dp, kb);
        gq[b][h].narrow(0, sp.first + sp.off, n - sp.off).copy_(gq_t.narrow(0, sp.off, n - sp.off));
        if (sp.off > 0) dp.narrow(0, 0, sp.off).zero_();
        at::Tensor gk_t = as_matrix(addbuf, ks, D);
        at::mm_out(gk_t, dp.t(), qb);
        gk[b][h].narrow(0, 0, ks).add_(gk_t);
      }
    }
  });
  return {gq, gk, gv};
}

}  // namespace

TORCH_LIBRARY(qat_cpu, m) {
  m.def(
      "block_attention_forward(Tensor q, Tensor k, Tensor v, Tensor? mask, float scaling, "
      "Tensor stops, int rows, int block, int m_bits, int e_lo, int e_hi) -> Tensor[]");
  m.def(
      "block_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? mask, "
      "Tensor stats, float scaling, Tensor stops, int rows, int block, int m_bits, int e_lo, int e_hi) "
      "-> Tensor[]");
}

TORCH_LIBRARY_IMPL(qat_cpu, CPU, m) {
  m.impl("block_attention_forward", &forward);
  m.impl("block_attention_backward", &backward);
}
