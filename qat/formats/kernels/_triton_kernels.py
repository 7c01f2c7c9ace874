"""Triton kernels that fake-quantise one tile of blocks in registers (imported only with triton).

Every helper mirrors the float32 operation order of the reference in ``qat/formats`` so the
results agree bit for bit. Rules that keep them exact on a GPU as well as under the interpreter:

- no ``exp2``/``log2``: exponents come from the float32 bit pattern and powers of two are built
  from bits (subnormal ones included), so scaling by ``2^k`` is exact;
- dividing by a power of two is multiplying by its exact reciprocal (same real value, same
  rounding); the codebook scale is not a power of two, so it uses ``div_rn``;
- round half to even is ``(v + 2^23) - 2^23`` for ``0 <= v < 2^23`` (exact in float32), and the
  launcher passes ``enable_fp_fusion=False`` so a multiply is never fused into that add.
"""

import triton
import triton.language as tl

# The format families (KIND) and tile layouts (LAYOUT) of fake_quantize_kernel: the values of
# _plan.KIND_* / LAYOUT_*, as triton constants (this file is also compiled on its own, without
# the package; tests/unit/formats/test_kernels.py checks that the two agree).
KIND_BFP = tl.constexpr(0)
KIND_MX = tl.constexpr(1)
KIND_CODEBOOK = tl.constexpr(2)
KIND_GGML = tl.constexpr(3)
KIND_NVFP4 = tl.constexpr(4)
LAYOUT_BLOCKS = tl.constexpr(0)
LAYOUT_WIDE = tl.constexpr(1)
LAYOUT_NARROW = tl.constexpr(2)


@triton.jit
def _pow2(k):
    """Exact float32 ``2^k`` for int32 ``k``: normal, subnormal (-149..-127), 0 below, inf above."""
    k = tl.minimum(k, 128)
    normal = ((k + 127) << 23).to(tl.float32, bitcast=True)
    shift = tl.minimum(tl.maximum(k + 149, 0), 22)
    sub = (tl.full(k.shape, 1, tl.int32) << shift).to(tl.float32, bitcast=True)
    return tl.where(k >= -126, normal, tl.where(k >= -149, sub, 0.0))


@triton.jit
def _floor_log2(a):
    """``floor(log2 a)`` and ``a is not a power of two`` for finite float32 ``a > 0``."""
    # Subnormals have no implicit bit: scale by 2^64 (exact) to read a normal exponent field.
    sub = a < 1.1754943508222875e-38
    b = tl.where(sub, tl.where(sub, a, 0.0) * 18446744073709551616.0, a)
    b = b.to(tl.int32, bitcast=True)
    fl = ((b >> 23) & 0xFF) - 127 - tl.where(sub, 64, 0)
    return fl, (b & 0x7FFFFF) != 0


@triton.jit
def _rne_pos(v):
    """Round half to even of float32 ``v >= 0`` (``torch.round``); inf stays inf."""
    return tl.where(v < 8388608.0, (v + 8388608.0) - 8388608.0, v)


@triton.jit
def _copysign(mag, s):
    """``mag`` (>= 0) with the sign bit of ``s`` (-0.0 counts as negative, like copysign)."""
    return tl.where(s.to(tl.int32, bitcast=True) < 0, -mag, mag)


@triton.jit
def _abs_max(src, AXIS: tl.constexpr):
    """``|x|`` and each block's max of it (kept as a dim of 1, to broadcast over the block)."""
    a = tl.abs(src)
    return a, tl.max(a, axis=AXIS, keep_dims=True)


@triton.jit
def _clamp(v, lo, hi):
    return tl.minimum(tl.maximum(v, lo), hi)


@triton.jit
def _block_error(src, q, amax, AXIS: tl.constexpr, FRAC: tl.constexpr):
    # qat/formats/scale.py block_error: sum(round(|q - x| * 2^(F - E))^2) in int64, E the frexp
    # exponent of amax; exact integers, so the reduction order cannot change the choice.
    fl, _ = _floor_log2(amax)
    k = FRAC - tl.where(amax > 0, fl + 1, 0)
    k1 = tl.minimum(tl.maximum(k, -126), 127)
    t = (tl.abs(q - src) * _pow2(k1)) * _pow2(k - k1)
    n = _rne_pos(t).to(tl.int64)
    return tl.sum(n * n, axis=AXIS, keep_dims=True)


@triton.jit
def _pick(src, amax, q_c, best_q, err, AXIS: tl.constexpr, FRAC: tl.constexpr):
    """One ``scale: mse`` candidate's values ``q_c`` against the best so far: taken only when
    its block error is strictly smaller (so ties keep the earlier candidate)."""
    err_c = _block_error(src, q_c, amax, AXIS, FRAC)
    better = err_c < err
    return tl.where(better, q_c, best_q), tl.where(better, err_c, err)


@triton.jit
def _mse_choice(src, amax, q, q_down, q_up, AXIS: tl.constexpr, FRAC: tl.constexpr):
    """``scale: mse`` (qat/formats/scale.py best_exponent): the values ``q`` of the max-rule
    exponent e, or those of e - 1 (``q_down``), then e + 1 (``q_up``), each taken only when its
    block error is strictly smaller, in MSE_OFFSETS order."""
    err = _block_error(src, q, amax, AXIS, FRAC)
    q, err = _pick(src, amax, q_down, q, err, AXIS, FRAC)
    q, _ = _pick(src, amax, q_up, q, err, AXIS, FRAC)
    return q


@triton.jit
def _bfp_values(src, a, e, M_BITS: tl.constexpr, M_POW: tl.constexpr, MANT_MAX: tl.constexpr):
    t = (a * _pow2(-e)) * M_POW
    r = tl.minimum(_rne_pos(t), MANT_MAX)
    sgn = tl.where(src > 0, 1.0, tl.where(src < 0, -1.0, 0.0))
    return (r * sgn) * _pow2(e - M_BITS)


@triton.jit
def _bfp(
    src,
    AXIS: tl.constexpr,
    M_BITS: tl.constexpr,
    M_POW: tl.constexpr,
    MANT_MAX: tl.constexpr,
    E_LO: tl.constexpr,
    E_HI: tl.constexpr,
    FRAC: tl.constexpr,
):
    # qat/formats/bfp.py: e = clamp(ceil(log2 amax)); |x| * 2^-e * 2^M; round; clamp; * sign;
    # * 2^(e - M). FRAC > 0 (scale: mse): the best of e, e - 1, e + 1 (qat/formats/scale.py).
    a, amax = _abs_max(src, AXIS)
    fl, frac = _floor_log2(amax)
    e = _clamp(tl.where(amax > 0, fl + frac.to(tl.int32), E_LO), E_LO, E_HI)
    q = _bfp_values(src, a, e, M_BITS, M_POW, MANT_MAX)
    if FRAC > 0:
        q = _mse_choice(
            src,
            amax,
            q,
            _bfp_values(src, a, tl.maximum(e - 1, E_LO), M_BITS, M_POW, MANT_MAX),
            _bfp_values(src, a, tl.minimum(e + 1, E_HI), M_BITS, M_POW, MANT_MAX),
            AXIS,
            FRAC,
        )
    return q


@triton.jit
def _round_float(v, M_BITS: tl.constexpr, STEP_MIN: tl.constexpr, MAXV: tl.constexpr):
    """qat/formats/floatcast.py round_to_float of finite float32 ``v``: nearest even on the grid
    of M_BITS mantissa bits (steps never below 2^STEP_MIN), saturated at MAXV, sign kept."""
    mag = tl.abs(v)
    flm, _ = _floor_log2(mag)  # 0 gives a binade far below: the smallest step, and 0 stays 0
    step_e = tl.maximum(flm - M_BITS, STEP_MIN)
    r = _rne_pos(mag * _pow2(-step_e)) * _pow2(step_e)
    return _copysign(tl.minimum(r, MAXV), v)


@triton.jit
def _mx_values(
    src, e, M_BITS: tl.constexpr, STEP_MIN: tl.constexpr, MAXV: tl.constexpr, IS_INT: tl.constexpr
):
    v = src * _pow2(-e)
    if IS_INT:
        w = v * 64.0
        r = tl.minimum(_rne_pos(tl.abs(w)), 127.0)
        el = _copysign(r, w) * 0.015625
    else:
        el = _round_float(v, M_BITS, STEP_MIN, MAXV)
    return el * _pow2(e)


@triton.jit
def _mx(
    src,
    AXIS: tl.constexpr,
    M_BITS: tl.constexpr,
    EMAX: tl.constexpr,
    STEP_MIN: tl.constexpr,
    MAXV: tl.constexpr,
    IS_INT: tl.constexpr,
    FRAC: tl.constexpr,
):
    # qat/formats/mx.py + floatcast.py: e = clamp(floor(log2 amax) - emax, -127, 127);
    # v = x / 2^e; round v to the element grid (saturating); * 2^e. FRAC > 0 (scale: mse):
    # the best of e, e - 1, e + 1 (qat/formats/scale.py).
    a, amax = _abs_max(src, AXIS)
    fl, _ = _floor_log2(amax)
    e = _clamp(tl.where(amax > 0, fl, 0) - EMAX, -127, 127)
    q = _mx_values(src, e, M_BITS, STEP_MIN, MAXV, IS_INT)
    if FRAC > 0:
        q = _mse_choice(
            src,
            amax,
            q,
            _mx_values(src, tl.maximum(e - 1, -127), M_BITS, STEP_MIN, MAXV, IS_INT),
            _mx_values(src, tl.minimum(e + 1, 127 - EMAX), M_BITS, STEP_MIN, MAXV, IS_INT),
            AXIS,
            FRAC,
        )
    return q


@triton.jit
def _codebook(
    src,
    kidx,
    lv_ptr,
    mid_ptr,
    AXIS: tl.constexpr,
    NLEV: tl.constexpr,
    SIGNED: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    BP: tl.constexpr,
):
    # qat/formats/codebook.py quantize_blocks: s = absmax or the signed first largest |x|;
    # x / s; level = lv[count of midpoints <= x / s]; level * s.
    a, amax = _abs_max(src, AXIS)
    if SIGNED:
        first = tl.min(tl.where(a == amax, kidx, BP), axis=AXIS, keep_dims=True)
        s = tl.sum(tl.where(kidx == first, src, 0.0), axis=AXIS, keep_dims=True)
    else:
        s = amax
    zero = s == 0
    safe = tl.broadcast_to(tl.where(zero, 1.0, s), src.shape)
    v = tl.math.div_rn(src, safe)
    q = tl.zeros(src.shape, tl.float32) + tl.load(lv_ptr)
    # Midpoints are sorted, so the last one <= v selects lv[count of midpoints <= v].
    for i in tl.static_range(NLEV - 1):
        q = tl.where(v >= tl.load(mid_ptr + i), tl.load(lv_ptr + i + 1), q)
    q = q * safe
    if not HAS_ZERO:
        q = tl.where(zero, 0.0, q)
    return q


@triton.jit
def _floor_pos(v):
    """``floor(v)`` of float32 ``0 <= v < 2^23`` (exact: an integer near v, less 1 if above)."""
    r = _rne_pos(v)
    return tl.where(r > v, r - 1.0, r)


@triton.jit
def _ggml(src, kidx, AXIS: tl.constexpr, Q4: tl.constexpr, BP: tl.constexpr):
    # qat/formats/ggml.py: d from the block (Q8_0 amax / 127; Q4_0 the first signed max / -8),
    # codes from the float32 d and 1/d (d == 0: 0), values code * fp16(d). The product and the
    # + 8.5 stay two roundings (enable_fp_fusion=False), as C and the reference's _product.
    a, amax = _abs_max(src, AXIS)
    if Q4:
        first = tl.min(tl.where(a == amax, kidx, BP), axis=AXIS, keep_dims=True)
        # A max, not a sum: keeps a -0.0 maximum's sign (it sets the sign of d and of zeros).
        smax = tl.max(tl.where(kidx == first, src, -float("inf")), axis=AXIS, keep_dims=True)
        d = smax * -0.125  # = smax / -8 (same real value, same rounding)
    else:
        d = tl.math.div_rn(amax, tl.full(amax.shape, 127.0, tl.float32))
    nonzero = d != 0
    inv = tl.where(
        nonzero, tl.math.div_rn(tl.full(d.shape, 1.0, tl.float32), tl.where(nonzero, d, 1.0)), 0.0
    )
    v = src * inv  # +-inf where 1/d overflowed, NaN for 0 * inf (the reference's nan_to_num)
    d16 = _round_float(d, 10, -24, 65504.0)  # fp16_scale: fp16, subnormals, saturated
    if Q4:
        s = v + 8.5
        s = tl.where(s == s, s, 8.0)
        # trunc then clamp to [0, 15] = floor of s clamped to [0, 16] (trunc of s < 0 is <= 0).
        c = tl.minimum(_floor_pos(tl.minimum(tl.maximum(s, 0.0), 16.0)), 15.0)
        q = (c - 8.0) * d16
    else:
        # C's roundf (half away from zero) of |v|; |v| <= ~254 when finite, inf -> 127, NaN -> 0.
        m = tl.abs(v)
        small = m < 8388608.0
        ms = tl.where(small, m, 0.0)
        t = _floor_pos(ms)
        r = t + tl.where(ms - t >= 0.5, 1.0, 0.0)
        r = tl.where(small, r, tl.where(m == float("inf"), 127.0, tl.where(m == m, m, 0.0)))
        code = tl.where(v < 0, 0.0 - r, r)  # 0.0 - 0.0 is +0.0, as the reference's code
        q = code * d16
    return q


@triton.jit
def _nvfp4(src, g_ptr, AXIS: tl.constexpr):
    # qat/formats/nvfp4.py with the tensor's global scale g (computed before the launch):
    # s = e4m3(g * (amax / 6)), 0.125 where 0; S = s / g; e2m1(clamp(x / S, -6, 6)) * S.
    g = tl.load(g_ptr)
    amax = tl.max(tl.abs(src), axis=AXIS, keep_dims=True)
    six = tl.full(amax.shape, 6.0, tl.float32)
    s = _round_float(g * tl.math.div_rn(amax, six), 3, -9, 448.0)
    s = tl.where(s == 0, 0.125, s)
    eff = tl.broadcast_to(tl.math.div_rn(s, tl.zeros(s.shape, tl.float32) + g), src.shape)
    v = tl.minimum(tl.maximum(tl.math.div_rn(src, eff), -6.0), 6.0)
    return _round_float(v, 1, -1, 6.0) * eff


@triton.jit
def _to_f32(x):
    """Exact widening to float32 (bfloat16 by its bits: the interpreter's cast is approximate)."""
    if x.dtype == tl.bfloat16:
        b = (x.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) << 16
        return b.to(tl.float32, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def _from_f32(q, DT: tl.constexpr):
    """Finite float32 ``q`` saturated to DT's largest finite value (as the reference does, so
    a finite input never gives inf) and rounded to DT to nearest even, as ``Tensor.to`` does."""
    if DT == tl.bfloat16:
        big: tl.constexpr = 3.3895313892515355e38
    elif DT == tl.float16:
        big: tl.constexpr = 65504.0
    else:
        big: tl.constexpr = 3.4028234663852886e38
    q = tl.minimum(tl.maximum(q, -big), big)
    if DT == tl.bfloat16:
        # Round to nearest even on the bits (the interpreter's own cast truncates).
        b = q.to(tl.int32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        return r.to(tl.int16).to(tl.bfloat16, bitcast=True)
    return q.to(DT)


@triton.jit
def _quantize_tile(
    xf,
    kidx,
    lv_ptr,
    mid_ptr,
    AXIS: tl.constexpr,
    KIND: tl.constexpr,
    BP: tl.constexpr,
    P0: tl.constexpr,
    P1: tl.constexpr,
    P2: tl.constexpr,
    P3: tl.constexpr,
    P4: tl.constexpr,
    P5: tl.constexpr,
):
    # Non-finite values count as 0 for the block's scale and pass through unchanged.
    finite = tl.abs(xf) < float("inf")
    src = tl.where(finite, xf, 0.0)
    # P0..P5: the family's constants (_plan.BfpParams, MxParams, GgmlParams, CodebookParams)
    if KIND == KIND_BFP:
        q = _bfp(src, AXIS, P0, P1, P2, P3, P4, P5)
    elif KIND == KIND_MX:
        q = _mx(src, AXIS, P0, P1, P2, P3, P4, P5)
    elif KIND == KIND_GGML:
        q = _ggml(src, kidx, AXIS, P0, BP)
    elif KIND == KIND_NVFP4:
        q = _nvfp4(src, lv_ptr, AXIS)
    else:  # KIND_CODEBOOK
        q = _codebook(src, kidx, lv_ptr, mid_ptr, AXIS, P0, P1, P2, BP)
    return q, finite


@triton.jit
def fake_quantize_kernel(
    x_ptr,
    y_ptr,
    lv_ptr,
    mid_ptr,
    n,
    inner,
    nb,
    total,
    n_col_tiles,
    KIND: tl.constexpr,
    BLOCK: tl.constexpr,
    BP: tl.constexpr,
    TILE: tl.constexpr,
    LAYOUT: tl.constexpr,
    P0: tl.constexpr,
    P1: tl.constexpr,
    P2: tl.constexpr,
    P3: tl.constexpr,
    P4: tl.constexpr,
    P5: tl.constexpr,
):
    """x viewed as [outer, n, inner] (contiguous); blocks of BLOCK run along n.

    LAYOUT_BLOCKS (inner == 1): a [TILE, BP] tile of TILE consecutive blocks (``total`` =
    outer * nb of them), reduced along axis 1. LAYOUT_WIDE (wide inner): a [BP, TILE] tile,
    one block position ``(o, j)`` times TILE consecutive inner columns (vectorisable rows),
    reduced along axis 0; ``total`` = outer * nb positions times ``n_col_tiles``.
    LAYOUT_NARROW (narrow inner): a [BP, TILE] tile of TILE block columns ``(o, j, c)``, c
    fastest (``total`` = outer * nb * inner of them), so a tile spans several positions
    instead of idling masked lanes.
    """
    # Block and tile indices fit int32; element offsets are int64 (tensors may pass 2^31).
    pid = tl.program_id(0)
    k = tl.arange(0, BP)
    if LAYOUT == LAYOUT_BLOCKS:
        g = pid * TILE + tl.arange(0, TILE)
        row = g // nb
        p = (g % nb) * BLOCK
        pos = p[:, None] + k[None, :]
        mask = (g < total)[:, None] & (k < BLOCK)[None, :] & (pos < n)
        offs = row.to(tl.int64)[:, None] * n + pos
        kidx = tl.broadcast_to(k[None, :], (TILE, BP))
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        q, finite = _quantize_tile(
            _to_f32(x), kidx, lv_ptr, mid_ptr, 1, KIND, BP, P0, P1, P2, P3, P4, P5
        )
    else:
        if LAYOUT == LAYOUT_WIDE:
            blk = pid // n_col_tiles
            c = (pid % n_col_tiles) * TILE + tl.arange(0, TILE)
            pos = (blk % nb) * BLOCK + k
            mask = ((k < BLOCK) & (pos < n))[:, None] & (c < inner)[None, :]
            offs = ((blk // nb).to(tl.int64) * n + pos)[:, None] * inner + c[None, :]
        else:
            col = pid * TILE + tl.arange(0, TILE)
            c = col % inner
            blk = col // inner
            pos = ((blk % nb) * BLOCK)[None, :] + k[:, None]
            mask = (col < total)[None, :] & (k < BLOCK)[:, None] & (pos < n)
            offs = ((blk // nb).to(tl.int64)[None, :] * n + pos) * inner + c[None, :]
        kidx = tl.broadcast_to(k[:, None], (BP, TILE))
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        q, finite = _quantize_tile(
            _to_f32(x), kidx, lv_ptr, mid_ptr, 0, KIND, BP, P0, P1, P2, P3, P4, P5
        )
    # Non-finite inputs are stored back as they came (their bits untouched).
    y = tl.where(finite, _from_f32(q, y_ptr.dtype.element_ty), x)
    tl.store(y_ptr + offs, y, mask=mask)


@triton.jit
def finite_absmax_kernel(x_ptr, part_ptr, numel, CHUNK: tl.constexpr):
    """``part[pid]`` = the largest finite |x| of the pid-th CHUNK elements (0 if none)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    a = tl.abs(_to_f32(tl.load(x_ptr + offs, mask=offs < numel, other=0.0)))
    a = tl.where(a < float("inf"), a, 0.0)  # NaN and inf count as 0, as in Format.quantize
    tl.store(part_ptr + pid, tl.max(a, axis=0))
