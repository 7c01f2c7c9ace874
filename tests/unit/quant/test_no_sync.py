"""No host sync in the quantisers, the quantised modules or attention.

A device-to-host sync (``bool(tensor)``, ``.item()``, ``.tolist()``) stalls a GPU's queue; on
the CPU the same calls can be caught by making them raise. Every registered format must
quantise, and a small W4A4 model must run forward and backward, with them patched to raise.
"""

import contextlib

import pytest
import torch
from tiny import tiny_batch, tiny_model

from qat import quantize_model
from qat.formats import FORMATS, make_format


class HostSync(AssertionError):
    pass


@contextlib.contextmanager
def no_host_sync():
    def refuse(name):
        def f(self, *a, **k):
            raise HostSync(f"host sync: Tensor.{name} called")

        return f

    saved = {n: getattr(torch.Tensor, n) for n in ("__bool__", "item", "tolist")}
    try:
        for n in saved:
            setattr(torch.Tensor, n, refuse(n))
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def test_the_patch_catches_syncs():
    with no_host_sync(), pytest.raises(HostSync):
        bool(torch.ones(1) > 0)
    with no_host_sync(), pytest.raises(HostSync):
        torch.ones(1).item()


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_format_quantises_without_sync(name):
    fmt = make_format({"format": name})
    if name == "lobcq":
        fmt.codebooks  # noqa: B018 - resolved once at set-up, as quantize_model does
    x = torch.randn(4, 6, 130) * 3
    x[0, 0, 5] = float("nan")
    x[1, 2, 7] = float("inf")
    fmt.quantize(x, -1)  # warm per-device tables (set-up work)
    with no_host_sync():
        for dim in (-1, 1, 0):
            q = fmt.quantize(x, dim)
            assert q.shape == x.shape
        for dt in (torch.float16, torch.bfloat16):
            assert fmt.quantize(x.to(dt), -1).dtype == dt


W4A4 = {
    "weight": {"format": "bfp", "width": 4},
    "activation": {"format": "bfp", "width": 4},
    "matmul": {"format": "bfp", "width": 4},
}


@pytest.mark.parametrize("arch", ["opt", "llama", "bert", "gpt2"])
def test_quantised_model_step_without_sync(arch, monkeypatch):
    """Forward and backward of a W4A4 model: our modules and attention never sync.

    transformers' own code (mask construction) may inspect tensors, so the patch is active
    inside our quantised linears, quantisers and attention function, and for the whole
    backward pass. On a CPU the attention reads the mask's extent on the host on purpose (free
    there: its tiles' key stops); an accelerator's mask is never read, as emulated here."""
    from qat.quant.attention import block as block_attention
    from qat.quant.attention import interface as attention

    monkeypatch.setattr(block_attention, "HOST_READ_DEVICES", frozenset())

    model = quantize_model(tiny_model(arch), W4A4)
    batch = tiny_batch()
    model(**batch)  # warm-up: per-device caches
    active = []

    def enter(*_):
        active.append(no_host_sync())
        active[-1].__enter__()

    def leave(*_):
        active.pop().__exit__(None, None, None)

    from qat.quant.modules import QuantConv1D, QuantLinear
    from qat.quant.ste import FakeQuantizer

    hooks = []
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantConv1D, FakeQuantizer)):
            hooks.append(m.register_forward_pre_hook(enter))
            hooks.append(m.register_forward_hook(leave))
    inner = attention.qat_attention_forward

    def guarded(*a, **k):
        with no_host_sync():
            return inner(*a, **k)

    from transformers import AttentionInterface

    AttentionInterface.register(attention.ATTN_IMPLEMENTATION, guarded)
    try:
        out = model(**batch)
        loss = out.loss
        with no_host_sync():
            loss.backward()
    finally:
        AttentionInterface.register(attention.ATTN_IMPLEMENTATION, inner)
        for h in hooks:
            h.remove()
    assert not active
    assert all(
        p.grad is not None
        for n, p in model.named_parameters()
        if p.requires_grad
        and "embed" not in n
        and "wpe" not in n
        and "wte" not in n
        and "position" not in n
        and "token_type" not in n
    )
