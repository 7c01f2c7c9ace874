"""The Triton kernel of LO-BCQ (imported only with triton): ``qat.formats.lobcq`` bit for bit.

x is viewed as ``[outer, n, inner]`` with arrays of ``LA`` scalars along n; a "row" is one
``(outer, inner)`` pair, so blocks run along any dim without a transposed copy (for inner > 1,
neighbouring rows are neighbouring columns: the loads of a tile are contiguous). A program
takes ``TILE`` rows and one array position: it reads the array for its max, then takes the
i-th scalar of all its blocks at once, for i = 0 .. LB - 1: each scalar loads its bin's row
of the transposed lookup table (its nearest entry in every codebook, ``NCP`` lanes, padding
lanes +inf) and adds its squared error to its block's sum for every codebook in a ``[TILE,
NBP, NCP]`` accumulator, so each block's sum runs left to right as in the reference;
``argmin`` (ties to the lowest index) picks the codebook.

Exact on a GPU as under the interpreter by the rules of ``_triton_kernels``: powers of two from
bits, ``amax / 31`` correctly rounded (``div_rn``), no fused multiply-add
(``enable_fp_fusion=False`` at launch).
"""

import triton
import triton.language as tl

from qat.formats.kernels._triton_kernels import _floor_log2, _from_f32, _pow2, _to_f32


@triton.jit
def _array_exponent(amax):
    """qat/formats/lobcq.py array_exponent: the smallest e in [-127, 127] with
    amax <= 31 * 2^e (amax = 0, or a quotient that underflows to 0: -127)."""
    t = tl.math.div_rn(tl.where(amax > 0, amax, 31.0), tl.full(amax.shape, 31.0, tl.float32))
    pos = t > 0
    fl, frac = _floor_log2(tl.where(pos, t, 1.0))
    e = fl + frac.to(tl.int32)
    e = e + (amax > 31.0 * _pow2(e)).to(tl.int32)  # the division may have rounded down
    e = tl.where(pos & (amax > 0), e, -127)
    return tl.minimum(tl.maximum(e, -127), 127)


@triton.jit
def _floor_small(v):
    """``floor(v)`` of float32 ``|v| < 2^22``, exactly: ``tl.floor`` compiles to an ``.ftz``
    instruction, which would read a negative subnormal as -0 (floor 0, not -1)."""
    r = (v + 12582912.0) - 12582912.0  # round half to even: 1.5 * 2^23 leaves units only
    return tl.where(r > v, r - 1.0, r)


@triton.jit
def _scaled(x_ptr, offs, mask, inv):
    """Raw x, whether it is finite, and y = clamp(x * 2^-e, -31, 31) with its lookup bin."""
    raw = tl.load(x_ptr + offs, mask=mask, other=0.0)
    xf = _to_f32(raw)
    finite = tl.abs(xf) < float("inf")
    y = tl.where(finite, xf, 0.0) * inv
    y = tl.minimum(tl.maximum(y, -31.0), 31.0)
    b = tl.minimum(tl.maximum(_floor_small(2.0 * y) + 62.0, 0.0), 124.0).to(tl.int32)
    return raw, finite, y, b


@triton.jit
def lobcq_kernel(
    x_ptr,
    y_ptr,
    table_ptr,
    n,
    inner,
    rows,
    arrays,
    LB: tl.constexpr,
    LA: tl.constexpr,
    LAP: tl.constexpr,
    NBP: tl.constexpr,
    NCP: tl.constexpr,
    TILE: tl.constexpr,
):
    pid = tl.program_id(0)
    a = pid % arrays
    r = (pid // arrays) * TILE + tl.arange(0, TILE)
    live = r < rows
    # element (row, pos) lies at (o * n + pos) * inner + c; int64: tensors may pass 2^31
    base = (r // inner).to(tl.int64) * n * inner + (r % inner)
    k = tl.arange(0, LAP)
    pos = a * LA + k
    inside = live[:, None] & ((k < LA) & (pos < n))[None, :]
    xa = _to_f32(tl.load(x_ptr + base[:, None] + pos.to(tl.int64)[None, :] * inner, inside, 0.0))
    amax = tl.max(tl.where(tl.abs(xa) < float("inf"), tl.abs(xa), 0.0), axis=1)
    e = _array_exponent(amax)
    inv = _pow2(-e)[:, None]
    scale = _pow2(e)[:, None]
    zero = (amax == 0)[:, None]
    # [TILE, NBP] tiles: scalar i of every block j of the array, at a time
    jb = tl.arange(0, NBP)
    lanes = tl.arange(0, NCP)[None, None, :]
    acc = tl.zeros((TILE, NBP, NCP), tl.float32)
    for i in tl.static_range(LB):
        at = a * LA + jb * LB + i
        real = live[:, None] & ((jb < LA // LB) & (at < n))[None, :]  # padding adds nothing
        offs = base[:, None] + at.to(tl.int64)[None, :] * inner
        _, _, y, b = _scaled(x_ptr, offs, real, inv)
        d = y[:, :, None] - tl.load(table_ptr + b[:, :, None] * NCP + lanes)
        acc = tl.where(real[:, :, None], acc + d * d, acc)
    best = tl.argmin(acc, axis=2, tie_break_left=True)
    for i in tl.static_range(LB):
        at = a * LA + jb * LB + i
        real = live[:, None] & ((jb < LA // LB) & (at < n))[None, :]
        offs = base[:, None] + at.to(tl.int64)[None, :] * inner
        raw, finite, _, b = _scaled(x_ptr, offs, real, inv)
        q = tl.where(zero, 0.0, tl.load(table_ptr + b * NCP + best) * scale)
        out = tl.where(finite, _from_f32(q, y_ptr.dtype.element_ty), raw)
        tl.store(y_ptr + offs, out, mask=real)
