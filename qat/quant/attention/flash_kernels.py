"""Triton kernels of the quantised attention, flash-attention style (imported only with triton).

One program takes a tile of query rows (forward, dQ) or of keys (dK, dV) of one (batch, head)
and walks over the other side in tiles; no ``L x L`` tensor is ever written. Each score tile
repeats the reference's roundings (``qat.quant.attention.block._scores_to_out``): the matmul,
the scaling and an additive mask of the inputs' dtype are rounded to that dtype, a boolean mask
fills the dtype's minimum, the softmax is float32 and P is rounded to the dtype before the P
format quantises it (``_bfp`` of the format kernels, on blocks of ``PB`` consecutive keys).

Softmax statistics: pass 1 gives each row's max ``m`` (exact) and normaliser ``l`` (online, so
rounded otherwise than torch's softmax); P is ``exp(S - m) / l``. A key tile whose mask entries
are all "masked" is skipped when every row of the query tile has already seen an unmasked key:
its P is then exactly 0 (``exp`` of about the dtype's minimum), so skipping changes no value.
"""

import triton
import triton.language as tl

from qat.formats.kernels import _plan
from qat.formats.kernels._triton_kernels import _bfp, _from_f32, _to_f32

# MASK_KIND: no mask, a boolean one (keep where true), an additive one (_plan.MASK_*)
MASK_NONE = tl.constexpr(_plan.MASK_NONE)
MASK_BOOL = tl.constexpr(_plan.MASK_BOOL)
MASK_ADDITIVE = tl.constexpr(_plan.MASK_ADDITIVE)


@triton.jit
def _round_dt(x, DT: tl.constexpr):
    """float32 ``x`` rounded to DT (nearest even) and widened back: a dtype intermediate."""
    if DT == tl.float32:
        return x
    return _to_f32(_from_f32(x, DT))


@triton.jit
def _dot(a, b, DT: tl.constexpr, WIDEN: tl.constexpr):
    # float32 operands take the exact (ieee) product, as torch's default float32 matmul.
    # WIDEN (the interpreter, whose half-precision dot is wrong): the same products in float32.
    if DT == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    if WIDEN:
        return tl.dot(_to_f32(a), _to_f32(b), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _dead(mask_ptr, mbase, offs_m, offs_n, Lq, Lk, smm, smn, MASK_KIND: tl.constexpr, MASK_MIN):
    """Per element of the tile: masked (or outside the matrix) and its mask value (bool: keep;
    additive: the float32 value to add)."""
    inside = (offs_m[:, None] < Lq) & (offs_n[None, :] < Lk)
    ptrs = mask_ptr + mbase + offs_m[:, None].to(tl.int64) * smm + offs_n[None, :] * smn
    if MASK_KIND == MASK_BOOL:
        keep = tl.load(ptrs, mask=inside, other=0) != 0
        return ~keep, keep.to(tl.float32)
    elif MASK_KIND == MASK_ADDITIVE:
        add = _to_f32(tl.load(ptrs, mask=inside, other=0.0))
        return (add <= MASK_MIN) | ~inside, add
    else:
        return ~inside, inside.to(tl.float32)


@triton.jit
def _skip(dead, rows_ok, MASK_KIND: tl.constexpr):
    """Whether a key tile contributes exactly nothing to these rows (see the module doc)."""
    if MASK_KIND == MASK_NONE:
        return False
    return (tl.min(dead.to(tl.int32)) == 1) & (tl.min(rows_ok.to(tl.int32)) == 1)


@triton.jit
def _scores(
    q,
    k,
    mval,
    offs_n,
    Lk,
    scaling,
    DT: tl.constexpr,
    SCALE: tl.constexpr,
    MASK_KIND: tl.constexpr,
    ROUND_ADD: tl.constexpr,
    FILL,
    WIDEN: tl.constexpr,
):
    """The float32 score tile, rounded as the reference rounds it; keys past Lk are -inf."""
    s = _round_dt(_dot(q, tl.trans(k), DT, WIDEN), DT)
    if SCALE:
        s = _round_dt(s * scaling, DT)
    if MASK_KIND == MASK_BOOL:
        s = tl.where(mval != 0, s, FILL)
    elif MASK_KIND == MASK_ADDITIVE:
        s = s + mval
        if ROUND_ADD:
            s = _round_dt(s, DT)
    return tl.where((offs_n < Lk)[None, :], s, -float("inf"))


@triton.jit
def _probs(s, m, norm, DT: tl.constexpr):
    """Softmax of the tile from the row statistics, float32, and rounded to DT."""
    p = tl.math.div_rn(tl.exp(s - m[:, None]), tl.broadcast_to(norm[:, None], s.shape))
    return p, _round_dt(p, DT)


@triton.jit
def _quant_p(
    p,
    BM: tl.constexpr,
    BN: tl.constexpr,
    QUANT_P: tl.constexpr,
    PB: tl.constexpr,
    P0: tl.constexpr,
    P1: tl.constexpr,
    P2: tl.constexpr,
    P3: tl.constexpr,
    P4: tl.constexpr,
    P5: tl.constexpr,
):
    """BFP of the (dtype-rounded) P tile on blocks of PB consecutive keys."""
    if QUANT_P:
        blocks = tl.reshape(p, (BM, BN // PB, PB))
        return tl.reshape(_bfp(blocks, 2, P0, P1, P2, P3, P4, P5), (BM, BN))
    return p


@triton.jit
def _load_rows(ptr, base, offs_r, offs_d, L, D):
    """A [rows, DP] tile of a contiguous [L, D] matrix (zeros outside)."""
    ptrs = ptr + base + offs_r[:, None].to(tl.int64) * D + offs_d[None, :]
    return tl.load(ptrs, mask=(offs_r[:, None] < L) & (offs_d[None, :] < D), other=0.0)


@triton.jit
def flash_forward_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    mask_ptr,
    m_ptr,
    l_ptr,
    H,
    Lq,
    Lk,
    D,
    DV,
    smb,
    smh,
    smm,
    smn,
    scaling,
    FILL,
    MASK_MIN,
    BM: tl.constexpr,
    BN: tl.constexpr,
    DP: tl.constexpr,
    DVP: tl.constexpr,
    SCALE: tl.constexpr,
    MASK_KIND: tl.constexpr,
    ROUND_ADD: tl.constexpr,
    WIDEN: tl.constexpr,
    QUANT_P: tl.constexpr,
    PB: tl.constexpr,
    P0: tl.constexpr,
    P1: tl.constexpr,
    P2: tl.constexpr,
    P3: tl.constexpr,
    P4: tl.constexpr,
    P5: tl.constexpr,
):
    """O = Q(P) V for BM query rows of one (batch, head); writes O, m and l."""
    DT: tl.constexpr = q_ptr.dtype.element_ty
    # one axis (no 65535 limit on batch x heads), the tiles of a head next to each other
    bh, t = tl.program_id(0) // tl.cdiv(Lq, BM), tl.program_id(0) % tl.cdiv(Lq, BM)
    offs_m = t * BM + tl.arange(0, BM)
    offs_d, offs_dv = tl.arange(0, DP), tl.arange(0, DVP)
    mbase = (bh // H).to(tl.int64) * smb + (bh % H).to(tl.int64) * smh
    q = _load_rows(q_ptr, bh.to(tl.int64) * Lq * D, offs_m, offs_d, Lq, D)
    kbase, vbase = bh.to(tl.int64) * Lk * D, bh.to(tl.int64) * Lk * DV
    outside = offs_m >= Lq
    m_i = tl.full((BM,), -float("inf"), tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    for n0 in range(0, Lk, BN):  # pass 1: row max and normaliser, online
        offs_n = n0 + tl.arange(0, BN)
        dead, mval = _dead(mask_ptr, mbase, offs_m, offs_n, Lq, Lk, smm, smn, MASK_KIND, MASK_MIN)
        if not _skip(dead, (m_i > FILL * 0.5) | outside, MASK_KIND):
            k = _load_rows(k_ptr, kbase, offs_n, offs_d, Lk, D)
            s = _scores(
                q, k, mval, offs_n, Lk, scaling, DT, SCALE, MASK_KIND, ROUND_ADD, FILL, WIDEN
            )
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
            m_i = m_new
    rows_ok = (m_i > FILL * 0.5) | outside
    acc = tl.zeros((BM, DVP), tl.float32)
    for n0 in range(0, Lk, BN):  # pass 2: exactly normalised P, quantised, times V
        offs_n = n0 + tl.arange(0, BN)
        dead, mval = _dead(mask_ptr, mbase, offs_m, offs_n, Lq, Lk, smm, smn, MASK_KIND, MASK_MIN)
        if not _skip(dead, rows_ok, MASK_KIND):
            k = _load_rows(k_ptr, kbase, offs_n, offs_d, Lk, D)
            s = _scores(
                q, k, mval, offs_n, Lk, scaling, DT, SCALE, MASK_KIND, ROUND_ADD, FILL, WIDEN
            )
            _, p = _probs(s, m_i, l_i, DT)
            pq = _quant_p(p, BM, BN, QUANT_P, PB, P0, P1, P2, P3, P4, P5)
            v = _load_rows(v_ptr, vbase, offs_n, offs_dv, Lk, DV)
            acc += _dot(_from_f32(pq, DT), v, DT, WIDEN)
    optrs = o_ptr + bh.to(tl.int64) * Lq * DV + offs_m[:, None].to(tl.int64) * DV + offs_dv[None, :]
    tl.store(optrs, _from_f32(acc, DT), mask=(~outside)[:, None] & (offs_dv[None, :] < DV))
    stat = bh.to(tl.int64) * Lq + offs_m
    tl.store(m_ptr + stat, m_i, mask=~outside)
    tl.store(l_ptr + stat, l_i, mask=~outside)


@triton.jit
def _grad_scores(
    p, dp, Dr, mval, scaling, DT: tl.constexpr, SCALE: tl.constexpr, MASK_KIND: tl.constexpr
):
    """dS of the score tile as the reference's autograd forms it: the softmax backward in
    float32 rounded to DT, zero where a boolean mask filled, times the scaling (rounded)."""
    ds = _round_dt(p * (dp - Dr[:, None]), DT)
    if MASK_KIND == MASK_BOOL:
        ds = tl.where(mval != 0, ds, 0.0)
    if SCALE:
        ds = _round_dt(ds * scaling, DT)
    return ds


@triton.jit
def flash_backward_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    mask_ptr,
    m_ptr,
    l_ptr,
    delta_ptr,
    dq_ptr,
    H,
    Lq,
    Lk,
    D,
    DV,
    smb,
    smh,
    smm,
    smn,
    scaling,
    FILL,
    MASK_MIN,
    BM: tl.constexpr,
    BN: tl.constexpr,
    DP: tl.constexpr,
    DVP: tl.constexpr,
    SCALE: tl.constexpr,
    MASK_KIND: tl.constexpr,
    ROUND_ADD: tl.constexpr,
    WIDEN: tl.constexpr,
):
    """For BM query rows: delta = rowsum(dP * P) (dP = dO V^T, the gradient of Q(P) passed
    straight through), then dQ = dS K."""
    DT: tl.constexpr = q_ptr.dtype.element_ty
    # one axis (no 65535 limit on batch x heads), the tiles of a head next to each other
    bh, t = tl.program_id(0) // tl.cdiv(Lq, BM), tl.program_id(0) % tl.cdiv(Lq, BM)
    offs_m = t * BM + tl.arange(0, BM)
    offs_d, offs_dv = tl.arange(0, DP), tl.arange(0, DVP)
    mbase = (bh // H).to(tl.int64) * smb + (bh % H).to(tl.int64) * smh
    q = _load_rows(q_ptr, bh.to(tl.int64) * Lq * D, offs_m, offs_d, Lq, D)
    do = _load_rows(do_ptr, bh.to(tl.int64) * Lq * DV, offs_m, offs_dv, Lq, DV)
    kbase, vbase = bh.to(tl.int64) * Lk * D, bh.to(tl.int64) * Lk * DV
    outside = offs_m >= Lq
    stat = bh.to(tl.int64) * Lq + offs_m
    m_i = tl.load(m_ptr + stat, mask=~outside, other=0.0)
    l_i = tl.load(l_ptr + stat, mask=~outside, other=1.0)
    rows_ok = (m_i > FILL * 0.5) | outside
    delta = tl.zeros((BM,), tl.float32)
    for n0 in range(0, Lk, BN):
        offs_n = n0 + tl.arange(0, BN)
        dead, mval = _dead(mask_ptr, mbase, offs_m, offs_n, Lq, Lk, smm, smn, MASK_KIND, MASK_MIN)
        if not _skip(dead, rows_ok, MASK_KIND):
            k = _load_rows(k_ptr, kbase, offs_n, offs_d, Lk, D)
            v = _load_rows(v_ptr, vbase, offs_n, offs_dv, Lk, DV)
            s = _scores(
                q, k, mval, offs_n, Lk, scaling, DT, SCALE, MASK_KIND, ROUND_ADD, FILL, WIDEN
            )
            p, _ = _probs(s, m_i, l_i, DT)
            dp = _round_dt(_dot(do, tl.trans(v), DT, WIDEN), DT)
            delta += tl.sum(dp * p, axis=1)
    tl.store(delta_ptr + stat, delta, mask=~outside)
    dq = tl.zeros((BM, DP), tl.float32)
    for n0 in range(0, Lk, BN):
        offs_n = n0 + tl.arange(0, BN)
        dead, mval = _dead(mask_ptr, mbase, offs_m, offs_n, Lq, Lk, smm, smn, MASK_KIND, MASK_MIN)
        if not _skip(dead, rows_ok, MASK_KIND):
            k = _load_rows(k_ptr, kbase, offs_n, offs_d, Lk, D)
            v = _load_rows(v_ptr, vbase, offs_n, offs_dv, Lk, DV)
            s = _scores(
                q, k, mval, offs_n, Lk, scaling, DT, SCALE, MASK_KIND, ROUND_ADD, FILL, WIDEN
            )
            p, _ = _probs(s, m_i, l_i, DT)
            dp = _round_dt(_dot(do, tl.trans(v), DT, WIDEN), DT)
            ds = _grad_scores(p, dp, delta, mval, scaling, DT, SCALE, MASK_KIND)
            dq += _dot(_from_f32(ds, DT), k, DT, WIDEN)
    dptrs = dq_ptr + bh.to(tl.int64) * Lq * D + offs_m[:, None].to(tl.int64) * D + offs_d[None, :]
    tl.store(dptrs, _from_f32(dq, DT), mask=(~outside)[:, None] & (offs_d[None, :] < D))


@triton.jit
def flash_backward_dkv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    mask_ptr,
    m_ptr,
    l_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,
    H,
    Lq,
    Lk,
    D,
    DV,
    smb,
    smh,
    smm,
    smn,
    scaling,
    FILL,
    MASK_MIN,
    BM: tl.constexpr,
    BN: tl.constexpr,
    DP: tl.constexpr,
    DVP: tl.constexpr,
    SCALE: tl.constexpr,
    MASK_KIND: tl.constexpr,
    ROUND_ADD: tl.constexpr,
    WIDEN: tl.constexpr,
    QUANT_P: tl.constexpr,
    PB: tl.constexpr,
    P0: tl.constexpr,
    P1: tl.constexpr,
    P2: tl.constexpr,
    P3: tl.constexpr,
    P4: tl.constexpr,
    P5: tl.constexpr,
):
    """For BN keys: dV = Q(P)^T dO and dK = dS^T Q over all query tiles."""
    DT: tl.constexpr = q_ptr.dtype.element_ty
    bh, t = tl.program_id(0) // tl.cdiv(Lk, BN), tl.program_id(0) % tl.cdiv(Lk, BN)
    offs_n = t * BN + tl.arange(0, BN)
    offs_d, offs_dv = tl.arange(0, DP), tl.arange(0, DVP)
    mbase = (bh // H).to(tl.int64) * smb + (bh % H).to(tl.int64) * smh
    k = _load_rows(k_ptr, bh.to(tl.int64) * Lk * D, offs_n, offs_d, Lk, D)
    v = _load_rows(v_ptr, bh.to(tl.int64) * Lk * DV, offs_n, offs_dv, Lk, DV)
    qbase, dobase = bh.to(tl.int64) * Lq * D, bh.to(tl.int64) * Lq * DV
    dk = tl.zeros((BN, DP), tl.float32)
    dv = tl.zeros((BN, DVP), tl.float32)
    for m0 in range(0, Lq, BM):
        offs_m = m0 + tl.arange(0, BM)
        outside = offs_m >= Lq
        stat = bh.to(tl.int64) * Lq + offs_m
        m_i = tl.load(m_ptr + stat, mask=~outside, other=0.0)
        dead, mval = _dead(mask_ptr, mbase, offs_m, offs_n, Lq, Lk, smm, smn, MASK_KIND, MASK_MIN)
        if not _skip(dead, (m_i > FILL * 0.5) | outside, MASK_KIND):
            l_i = tl.load(l_ptr + stat, mask=~outside, other=1.0)
            delta = tl.load(delta_ptr + stat, mask=~outside, other=0.0)
            q = _load_rows(q_ptr, qbase, offs_m, offs_d, Lq, D)
            do = _load_rows(do_ptr, dobase, offs_m, offs_dv, Lq, DV)
            s = _scores(
                q, k, mval, offs_n, Lk, scaling, DT, SCALE, MASK_KIND, ROUND_ADD, FILL, WIDEN
            )
            p, p_dt = _probs(s, m_i, l_i, DT)
            p = tl.where(outside[:, None], 0.0, p)  # rows past Lq add nothing
            pq = _quant_p(p_dt, BM, BN, QUANT_P, PB, P0, P1, P2, P3, P4, P5)
            dv += _dot(tl.trans(_from_f32(pq, DT)), do, DT, WIDEN)
            dp = _round_dt(_dot(do, tl.trans(v), DT, WIDEN), DT)
            ds = _grad_scores(p, dp, delta, mval, scaling, DT, SCALE, MASK_KIND)
            dk += _dot(tl.trans(_from_f32(ds, DT)), q, DT, WIDEN)
    inside = (offs_n < Lk)[:, None]
    rows = offs_n[:, None].to(tl.int64)
    tl.store(
        dk_ptr + bh.to(tl.int64) * Lk * D + rows * D + offs_d[None, :],
        _from_f32(dk, DT),
        mask=inside & (offs_d[None, :] < D),
    )
    tl.store(
        dv_ptr + bh.to(tl.int64) * Lk * DV + rows * DV + offs_dv[None, :],
        _from_f32(dv, DT),
        mask=inside & (offs_dv[None, :] < DV),
    )
