"""The Mamba layer and the Motion Mamba blocks (HTM, BSM): shapes, gradients, masks, state_dict compatibility."""

from __future__ import annotations

import pytest
import torch
from scan_reference import selective_scan_ref

from backend.models import scan_kernel, ssm
from backend.models.blocks import BidirectionalSpatialMamba, HierarchicalTemporalMamba
from backend.models.mamba import Mamba

# mamba_ssm.modules.mamba_simple.Mamba(d_model=16) parameters, names and shapes (d_inner 32, dt_rank 1).
MAMBA_SSM_PARAMETERS = {
    "A_log": (32, 16), "D": (32,), "in_proj.weight": (64, 16), "conv1d.weight": (32, 1, 4),
    "conv1d.bias": (32,), "x_proj.weight": (1 + 2 * 16, 32), "dt_proj.weight": (32, 1),
    "dt_proj.bias": (32,), "out_proj.weight": (16, 32),
}


def seeded(module_cls, *args, seed=0, **kwargs):
    torch.manual_seed(seed)
    return module_cls(*args, **kwargs)


def test_mamba_parameters_match_mamba_ssm_names_shapes_and_init():
    layer = seeded(Mamba, 16)
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == MAMBA_SSM_PARAMETERS
    torch.testing.assert_close(-torch.exp(layer.A_log), -torch.arange(1, 17.0).expand(32, 16))
    assert torch.equal(layer.D, torch.ones(32))
    dt = torch.nn.functional.softplus(layer.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001  # softplus(dt_bias) in [dt_min, dt_max]


@pytest.mark.parametrize("length", [1, 2, 7, 33])
def test_mamba_shapes_and_gradients(length):
    layer = seeded(Mamba, 12, d_state=8)
    x = torch.randn(3, length, 12, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().sum().backward()
    assert x.grad.abs().sum() > 0
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if not (name == "A_log" and length == 1):  # one step: the state starts at 0, A has no effect yet
            assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def reference_mamba_forward(layer: Mamba, x: torch.Tensor) -> torch.Tensor:
    """mamba_ssm's Mamba.forward without its fused kernels (the path it takes when causal-conv1d is absent),
    on the oracle scan."""
    length = x.shape[1]
    xz = (layer.in_proj.weight @ x.reshape(-1, x.shape[-1]).T).reshape(-1, x.shape[0], length).permute(1, 0, 2)
    u, z = xz.chunk(2, dim=1)
    u = torch.nn.functional.silu(layer.conv1d(u)[..., :length])
    x_dbl = layer.x_proj(u.permute(0, 2, 1).reshape(-1, layer.d_inner))
    dt, B, C = torch.split(x_dbl, [layer.dt_rank, layer.d_state, layer.d_state], dim=-1)
    dt = (layer.dt_proj.weight @ dt.T).reshape(layer.d_inner, x.shape[0], length).permute(1, 0, 2)
    B = B.reshape(x.shape[0], length, -1).permute(0, 2, 1)
    C = C.reshape(x.shape[0], length, -1).permute(0, 2, 1)
    y = selective_scan_ref(u, dt, -torch.exp(layer.A_log.float()), B, C, layer.D.float(), z=z,
                           delta_bias=layer.dt_proj.bias.float(), delta_softplus=True)
    return layer.out_proj(y.permute(0, 2, 1))


def test_mamba_matches_mamba_ssm_reference_forward_and_gradients():
    layer = seeded(Mamba, 16, d_state=8)
    x = torch.randn(2, 21, 16, requires_grad=True)
    ours, ref = layer(x), reference_mamba_forward(layer, x)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    weight = torch.randn_like(ours)
    params = [x, *layer.parameters()]
    for a, b in zip(torch.autograd.grad((ours * weight).sum(), params),
                    torch.autograd.grad((ref * weight).sum(), params)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("batch", "length", "d_model", "d_conv"),
                         [(1, 1, 8, 4), (2, 3, 16, 4), (3, 50, 12, 4), (1, 200, 32, 4), (2, 9, 8, 2), (1, 6, 8, 7)])
def test_mamba_inference_matches_the_reference(batch, length, d_model, d_conv, monkeypatch):
    """Without gradients (where the compiled scan is in use) the layer's convolution and SiLU run fused in the
    kernel and its scan skips autograd: mamba_ssm's reference forward all the same, also shorter than the
    convolution."""
    fused = []
    monkeypatch.setattr(scan_kernel, "conv_silu", lambda *a, f=scan_kernel.conv_silu: fused.append(1) or f(*a))
    layer = seeded(Mamba, d_model, d_conv=d_conv).eval()
    x = torch.randn(batch, length, d_model)
    with torch.inference_mode():
        ours, ref = layer(x), reference_mamba_forward(layer, x)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    assert len(fused) == int(ssm.uses_compiled_scan())
    layer(x.requires_grad_()).sum().backward()  # with gradients: the differentiable path
    assert len(fused) == int(ssm.uses_compiled_scan()) and layer.conv1d.weight.grad.abs().sum() > 0


def test_mamba_compiled_inference_path_is_the_general_path_bit_for_bit(monkeypatch):
    """Without autograd or a mask, the CPU layer takes its lean compiled path: the same numbers, bit for bit, as
    the general path run without gradients (frozen weights under grad mode), for every batch and length."""
    if not ssm.uses_compiled_scan():
        pytest.skip("the compiled scan kernel could not be built on this machine")
    taken = []
    original = Mamba._forward_compiled
    monkeypatch.setattr(Mamba, "_forward_compiled", lambda self, h: taken.append(1) or original(self, h))
    layer = seeded(Mamba, 24, d_state=16).eval()
    for batch, length in ((1, 1), (3, 17), (2, 100)):
        x = torch.randn(batch, length, 24)
        with torch.inference_mode():
            lean = layer(x)
        layer.requires_grad_(False)
        with torch.enable_grad():
            general = layer(x)
        layer.requires_grad_(True)
        assert torch.equal(lean, general)
    assert len(taken) == 3
    with torch.inference_mode():  # a mask takes the general path
        layer(x, mask=torch.ones(x.shape[:2], dtype=torch.bool))
    assert len(taken) == 3


def test_mamba_is_causal():
    layer = seeded(Mamba, 8).eval()
    x = torch.randn(1, 10, 8)
    changed = x.clone()
    changed[:, 6:] += 1.0
    with torch.no_grad():
        a, b = layer(x), layer(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_mamba_state_dict_round_trip_gives_identical_outputs():
    """A checkpoint from one layer (e.g. trained on a GPU) loads into a fresh one and reproduces it exactly."""
    source, target = seeded(Mamba, 16, seed=1), seeded(Mamba, 16, seed=2)
    x = torch.randn(2, 9, 16)
    assert not torch.allclose(source(x), target(x))
    target.load_state_dict(source.state_dict())
    torch.testing.assert_close(target(x), source(x), atol=0, rtol=0)


@pytest.mark.parametrize("where", ["right", "left"])
def test_mamba_padding_does_not_change_valid_frames(where):
    layer = seeded(Mamba, 8).eval()
    clip = torch.randn(1, 6, 8)
    garbage = torch.randn(1, 4, 8) * 10
    padded = torch.cat([clip, garbage] if where == "right" else [garbage, clip], dim=1)
    valid = torch.zeros(1, 10, dtype=torch.bool)
    valid[:, :6] = where == "right"
    valid[:, 4:] = valid[:, 4:] | (where == "left")
    with torch.no_grad():
        alone = layer(clip)
        out = layer(padded, mask=valid)
    torch.testing.assert_close(out[valid].view(1, 6, 8), alone, atol=1e-5, rtol=1e-5)
    assert torch.all(out[~valid] == 0)


def test_htm_shapes_gradients_and_scan_count():
    block = seeded(HierarchicalTemporalMamba, 16, num_scans=3, d_state=4)
    assert len(block.scans) == 3
    x = torch.randn(2, 13, 16, requires_grad=True)
    out = block(x)
    assert out.shape == x.shape
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())
    assert x.grad.abs().sum() > 0


def test_htm_mask_keeps_padding_out_of_valid_frames_in_both_directions():
    block = seeded(HierarchicalTemporalMamba, 16, num_scans=2).eval()
    clips = torch.randn(2, 9, 16)
    lengths = torch.tensor([9, 5])
    mask = torch.arange(9)[None] < lengths[:, None]
    batch = torch.where(mask[..., None], clips, torch.randn(2, 9, 16) * 100)  # garbage in the padding
    with torch.no_grad():
        out = block(batch, mask=mask)
        alone = block(clips[1:, :5])
        reversed_out = block(batch.flip(1), mask=mask.flip(1))  # reverse-direction scan: padding leads
        reversed_alone = block(clips[1:, :5].flip(1))
    torch.testing.assert_close(out[1, :5], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reversed_out[1, 4:], reversed_alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, 5:], batch[1, 5:])  # padded frames come out unchanged


def test_bsm_shapes_gradients_and_both_directions():
    block = seeded(BidirectionalSpatialMamba, 24, num_groups=6, d_state=4)
    x = torch.randn(2, 7, 24, requires_grad=True)
    out = block(x)
    assert out.shape == x.shape
    out.sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # Every group sees every other: the forward scan reaches later groups, the backward scan earlier ones.
    with torch.no_grad():
        changed = x.detach().clone()
        changed[..., 8:12] += 1.0  # group 2 of 6
        delta = (block(changed) - block(x.detach())).abs().reshape(2, 7, 6, 4).sum(dim=(0, 1, 3))
    assert torch.all(delta > 0)


def test_bsm_frames_are_independent_and_mask_keeps_padding():
    block = seeded(BidirectionalSpatialMamba, 16, num_groups=4).eval()
    x = torch.randn(1, 5, 16)
    mask = torch.tensor([[True, True, True, False, False]])
    with torch.no_grad():
        out = block(x, mask=mask)
        first = block(x[:, :3])
    torch.testing.assert_close(out[:, :3], first)
    torch.testing.assert_close(out[:, 3:], x[:, 3:])


def test_blocks_state_dict_round_trip():
    for make in (lambda: HierarchicalTemporalMamba(16, num_scans=2), lambda: BidirectionalSpatialMamba(16, 4)):
        source, target = seeded(make), seeded(lambda m=make: m(), seed=5)
        target.load_state_dict(source.state_dict())
        x = torch.randn(2, 6, 16)
        torch.testing.assert_close(target(x), source(x), atol=0, rtol=0)


@pytest.mark.parametrize(("call", "error"), [
    (lambda: Mamba(0), ValueError),
    (lambda: Mamba(8, dt_init="bad"), ValueError),
    (lambda: HierarchicalTemporalMamba(8, num_scans=0), ValueError),
    (lambda: BidirectionalSpatialMamba(10, num_groups=4), ValueError),
    (lambda: Mamba(8)(torch.zeros(2, 5, 7)), ValueError),
    (lambda: HierarchicalTemporalMamba(8, 1)(torch.zeros(5, 8)), ValueError),
    (lambda: HierarchicalTemporalMamba(8, 1)(torch.zeros(2, 5, 8), mask=torch.ones(2, 4, dtype=torch.bool)),
     ValueError),
    (lambda: BidirectionalSpatialMamba(8, 2)(torch.zeros(2, 5, 8), mask=torch.ones(2, 5)), TypeError),
])
def test_bad_arguments_are_clear_errors(call, error):
    with pytest.raises(error):
        call()


@pytest.mark.gpu
@pytest.mark.skipif(not ssm.mamba_ssm_available(), reason="needs CUDA and mamba_ssm's CUDA kernels")
def test_cpu_and_mamba_ssm_layers_share_parameters_and_outputs():
    from mamba_ssm.modules.mamba_simple import Mamba as MambaSSM

    ours = seeded(Mamba, 32)
    theirs = MambaSSM(32).cuda()
    theirs.load_state_dict(ours.state_dict())  # CPU checkpoint -> mamba_ssm on the GPU
    x = torch.randn(2, 40, 32)
    expected = ours(x)
    torch.testing.assert_close(theirs(x.cuda()).cpu(), expected, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(ours.cuda()(x.cuda()).cpu(), expected, atol=1e-3, rtol=1e-3)  # our fused path
    back = seeded(Mamba, 32, seed=9)
    back.load_state_dict({k: v.cpu() for k, v in theirs.state_dict().items()})  # GPU -> CPU
    torch.testing.assert_close(back(x), expected, atol=1e-5, rtol=1e-5)
