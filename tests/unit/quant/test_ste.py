"""The straight-through estimator: quantised forward, identity backward, input not detached."""

import torch

from qat.formats import make_format
from qat.quant.backends import fake_quantize
from qat.quant.ste import FakeQuantizer

FMT = make_format({"format": "bfp", "width": 3, "block_size": 4})


def test_forward_quantises_backward_is_identity():
    x = torch.randn(4, 8, requires_grad=True)
    y = fake_quantize(x, FMT)
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


def test_a_rotation_has_one_owner_the_quantiser_holds_a_reference():
    from torch import nn

    from qat.quant.modules import QuantLinear
    from qat.quant.rotation import Rotation

    layer = QuantLinear.from_linear(nn.Linear(8, 4), FakeQuantizer(FMT), FakeQuantizer(FMT))
    rotation = Rotation(4)
    layer.set_rotation(rotation)
    owners = [n for n, m in layer.named_modules(remove_duplicate=False) if m is rotation]
    assert owners == ["rotation"]  # the layer's submodule, not the quantisers'
    wq = layer.weight_quantizer
    assert wq.rotation is rotation and list(wq.children()) == []
    x = torch.randn(3, 8)
    assert torch.equal(wq(x), FMT.quantize(rotation(x, -1), -1))  # rotated, then quantised
    wq.rotation = Rotation(8)  # assigning a module still sets a reference, not a submodule
    assert list(wq.children()) == [] and wq.rotation.size == 8
    wq.rotation = None  # what a packed export's loader does: the weight is stored rotated
    assert torch.equal(wq(x), FMT.quantize(x, -1))
