"""Orthonormal matrices for rotations: Hadamard matrices of order ``2^k`` and ``2^k * m``, and
seeded random orthogonal ones.

A Hadamard matrix ``H`` of order ``n`` has entries +-1 and ``H H^T = n I``; ``H / sqrt(n)`` is
orthonormal and spreads any single large entry evenly over all ``n`` outputs. Orders built here:

- ``2^k``: Sylvester's doubling ``[[H, H], [H, -H]]`` (symmetric);
- ``m`` from Paley's constructions over the integers mod a prime ``p`` (the quadratic
  character ``chi``): Paley I gives order ``p + 1`` for ``p = 3 mod 4`` (12 from 11, 20 from
  19, 44 from 43, ...), Paley II order ``2 (p + 1)`` for ``p = 1 mod 4`` (28 from 13, 36 from
  17, 60 from 29, ...);
- ``2^k * m``: the Kronecker product of the two, so SmolLM2's residual width 576 = 36 x 16 and
  its MLP width 1536 = 12 x 128 have one.

``hadamard_order_supported(n)`` says whether ``n`` is one of these; ``SUPPORTED_ORDERS_TEXT`` is
the list an error message gives. Widths with no such order (e.g. 100) take ``random``: the Q of
the QR decomposition of a seeded Gaussian matrix (signs fixed so it is unique).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

PALEY_PRIME_LIMIT = 1024  # primes p < this: Paley orders up to 2 * 1024


def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % d for d in range(2, math.isqrt(p) + 1))


def _chi(p: int) -> list[int]:
    """The quadratic character mod prime ``p``: 0 at 0, +1 on squares, -1 otherwise."""
    squares = {(i * i) % p for i in range(1, p)}
    return [0] + [1 if a in squares else -1 for a in range(1, p)]


def _jacobsthal(p: int) -> Tensor:
    """``Q[i, j] = chi(j - i)``: antisymmetric for ``p = 3 mod 4``, symmetric for ``1 mod 4``."""
    chi = torch.tensor(_chi(p), dtype=torch.float64)
    i = torch.arange(p)
    return chi[(i[None, :] - i[:, None]) % p]


def paley1(p: int) -> Tensor:
    """Paley I, order ``p + 1`` (``p`` prime, ``p = 3 mod 4``): ``I + [[0, 1^T], [-1, Q]]``."""
    q = _jacobsthal(p)
    s = torch.zeros(p + 1, p + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, q
    return torch.eye(p + 1, dtype=torch.float64) + s


def paley2(p: int) -> Tensor:
    """Paley II, order ``2 (p + 1)`` (``p`` prime, ``p = 1 mod 4``): in ``[[0, 1^T], [1, Q]]``
    each 0 becomes ``[[1, -1], [-1, -1]]`` and each +-1 becomes +-``[[1, 1], [1, -1]]``."""
    q = _jacobsthal(p)
    c = torch.zeros(p + 1, p + 1, dtype=torch.float64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, q
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, one) + torch.kron((c == 0).double(), zero)


@functools.cache
def _paley_orders() -> dict[int, tuple[int, int]]:
    """Order ``m`` (not a power of two) -> ``(construction, p)``, the smallest ``p`` first."""
    orders: dict[int, tuple[int, int]] = {}
    for p in range(3, PALEY_PRIME_LIMIT):
        if not _is_prime(p):
            continue
        m, kind = (p + 1, 1) if p % 4 == 3 else (2 * (p + 1), 2)
        if m & (m - 1) and m not in orders:
            orders[m] = (kind, p)
    return orders


def _factor(n: int) -> tuple[int, int] | None:
    """``(m, 2^k)`` with ``n = m * 2^k`` and ``m`` a Paley order or 1 (the largest power of
    two that works), or None."""
    if n >= 1 and not n & (n - 1):
        return 1, n
    orders = _paley_orders()
    two = 1
    while n % (two * 2) == 0:
        two *= 2
    while two >= 1:
        if n // two in orders:
            return n // two, two
        two //= 2
    return None


def hadamard_order_supported(n: int) -> bool:
    """Whether ``hadamard_matrix(n)`` exists here.

    >>> [n for n in (12, 16, 24, 100, 576, 1536) if hadamard_order_supported(n)]
    [12, 16, 24, 576, 1536]"""
    return _factor(n) is not None


def _small_paley() -> str:
    ms = sorted(m for m in _paley_orders() if m % 8)  # 2 * m is covered by m
    return ", ".join(map(str, ms[:8]))


SUPPORTED_ORDERS_TEXT = (
    f"2^k, or 2^k x m for a Paley order m (m = {_small_paley()}, ...; "
    f"Paley I/II over primes below {PALEY_PRIME_LIMIT})"
)


def sylvester(n: int) -> Tensor:
    """The +-1 Sylvester-Hadamard matrix of power-of-two order ``n`` (float64, symmetric)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester-Hadamard matrix needs a power-of-two order, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.lru_cache(maxsize=32)
def _hadamard64(n: int) -> Tensor:
    f = _factor(n)
    if f is None:
        raise ValueError(f"no Hadamard matrix of order {n} here; orders: {SUPPORTED_ORDERS_TEXT}")
    m, two = f
    h = sylvester(two)
    if m > 1:
        kind, p = _paley_orders()[m]
        h = torch.kron(paley1(p) if kind == 1 else paley2(p), h)
    return h / math.sqrt(n)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The orthonormal Hadamard matrix of order ``n`` (entries ``+-1/sqrt(n)``): Sylvester for a
    power of two, else a Paley matrix Kronecker a Sylvester one; ValueError naming the orders
    that work otherwise.

    >>> h = hadamard_matrix(12, torch.float64)
    >>> bool(torch.allclose(h @ h.T, torch.eye(12, dtype=torch.float64)))
    True"""
    return _hadamard64(n).to(dtype)


def random_orthogonal(n: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """A seeded random orthogonal matrix: Q of the QR of a standard Gaussian (CPU generator,
    float64), each column's sign set so R's diagonal is positive (Haar-distributed, unique)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return (q * torch.sign(torch.diagonal(r)).unsqueeze(0)).to(dtype)


def random_signs(n: int, seed: int) -> Tensor:
    """A seeded +-1 float64 vector (the diagonal that randomises a Hadamard matrix)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
