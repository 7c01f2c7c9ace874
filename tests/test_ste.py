"""The straight-through estimator: quantised forward, identity backward, input not detached."""

import torch

from qat.formats import make_format
from qat.quant.ste import FakeQuantizer, ste_quantize

FMT = make_format({"format": "bfp", "width": 3, "block_size": 4})


def test_forward_quantises_backward_is_identity():
    x = torch.randn(4, 8, requires_grad=True)
    y = ste_quantize(x, FMT)
    assert torch.equal(y, FMT.quantize(x.detach()))
    assert not torch.equal(y, x)
    g = torch.randn(4, 8)
    y.backward(g)
    assert torch.equal(x.grad, g)


def test_fake_quantizer_keeps_graph_and_dim():
    w = torch.randn(6, 8, requires_grad=True)
    fq = FakeQuantizer(FMT, dim=0)
    out = fq(w)
    assert out.requires_grad and out.grad_fn is not None
    assert torch.equal(out, FMT.quantize(w.detach(), dim=0))
    (out * 3).sum().backward()
    assert torch.equal(w.grad, torch.full_like(w, 3.0))
    fq.enabled = False
    assert fq(w) is w
