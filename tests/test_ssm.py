"""The selective scan against the oracle (mamba_ssm's selective_scan_ref semantics): values and gradients."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scan_reference import selective_scan_ref

from backend.models import scan_kernel, ssm
from backend.models.ssm import selective_scan

GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(batch, dim, dstate, length, groups=0, with_D=True, with_z=True, with_bias=True, softplus=True,
                seed=0):
    """Random inputs in the ranges a trained Mamba sees: A < 0; delta goes through softplus, or is positive."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen) * scale + shift).requires_grad_()

    bc_shape = (batch, groups, dstate, length) if groups else (batch, dstate, length)
    return {
        "u": rand(batch, dim, length),
        "delta": rand(batch, dim, length, scale=0.5, shift=-1.0) if softplus
        else (torch.rand(batch, dim, length, generator=gen) * 0.5).requires_grad_(),
        "A": (-torch.rand(dim, dstate, generator=gen) * 2 - 0.05).requires_grad_(),
        "B": rand(*bc_shape),
        "C": rand(*bc_shape),
        "D": rand(dim) if with_D else None,
        "z": rand(batch, dim, length) if with_z else None,
        # without softplus the step delta + delta_bias must stay positive, or exp(delta A) > 1 blows up
        "delta_bias": (rand(dim, scale=0.3) if softplus else torch.rand(dim, generator=gen).mul(0.3).requires_grad_())
        if with_bias else None,
    }


def assert_matches_oracle(inputs, delta_softplus, return_last_state=False, tol=1e-4, atol=None):
    ours = selective_scan(**inputs, delta_softplus=delta_softplus, return_last_state=return_last_state)
    ref = selective_scan_ref(**inputs, delta_softplus=delta_softplus, return_last_state=return_last_state)
    if return_last_state:
        (ours, our_state), (ref, ref_state) = ours, ref
        torch.testing.assert_close(our_state, ref_state, atol=atol or tol, rtol=tol)
    torch.testing.assert_close(ours, ref, atol=atol or tol, rtol=tol)
    weight = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1)).to(ours.device)
    names = [n for n in GRAD_NAMES if inputs[n] is not None]
    tensors = [inputs[n] for n in names]
    ours_grad = torch.autograd.grad((ours * weight).sum(), tensors)
    ref_grad = torch.autograd.grad((ref * weight).sum(), tensors)
    for name, a, b in zip(names, ours_grad, ref_grad):
        scale = max(1.0, b.abs().max().item())  # gradients summed over long sequences grow; compare relatively
        torch.testing.assert_close(a / scale, b / scale, atol=atol or tol, rtol=tol,
                                   msg=lambda m, n=name: f"d{n}: {m}")


@pytest.fixture(params=["compiled", "torch"])
def implementation(request, monkeypatch):
    """Run a test with the compiled CPU kernel and with the plain-PyTorch fallback."""
    impl = ssm._implementation() if request.param == "compiled" else ssm._TorchScan
    if request.param == "compiled" and impl is ssm._TorchScan:
        pytest.skip("the compiled scan kernel could not be built on this machine")
    monkeypatch.setattr(ssm, "_implementation", lambda: impl)
    return impl


@pytest.mark.parametrize(("batch", "dim", "dstate", "length", "groups"), [
    (1, 1, 1, 1, 0),      # L = 1
    (2, 3, 5, 1, 0),
    (2, 4, 16, 7, 0),     # odd length
    (1, 5, 64, 33, 0),    # d_state 64
    (3, 6, 2, 128, 0),
    (2, 8, 16, 257, 0),   # long, odd; several checkpoint chunks in the compiled kernel
    (2, 6, 4, 19, 3),     # grouped B/C
    (1, 4, 8, 5, 4),      # one channel per group
])
def test_scan_matches_oracle(implementation, batch, dim, dstate, length, groups):
    inputs = make_inputs(batch, dim, dstate, length, groups=groups)
    assert_matches_oracle(inputs, delta_softplus=True, return_last_state=True)


@pytest.mark.parametrize(("b_groups", "c_groups"), [(0, 2), (2, 3)])
def test_scan_with_differently_grouped_B_and_C(implementation, b_groups, c_groups):
    inputs = make_inputs(2, 6, 4, 13, groups=c_groups)
    inputs["B"] = make_inputs(2, 6, 4, 13, groups=b_groups, seed=5)["B"]
    assert_matches_oracle(inputs, delta_softplus=True)


@pytest.mark.parametrize("with_D", [False, True])
@pytest.mark.parametrize("with_z", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("softplus", [False, True])
def test_scan_optional_terms(implementation, with_D, with_z, with_bias, softplus):
    inputs = make_inputs(2, 4, 3, 11, with_D=with_D, with_z=with_z, with_bias=with_bias, softplus=softplus, seed=3)
    assert_matches_oracle(inputs, delta_softplus=softplus)


@pytest.mark.parametrize(("batch", "dim", "dstate", "length", "groups"), [(2, 4, 16, 7, 0), (2, 8, 16, 257, 2)])
def test_inference_scan_matches_oracle(implementation, batch, dim, dstate, length, groups):
    """Without gradients the scan skips autograd (and the kernel keeps no checkpoints): same values."""
    inputs = make_inputs(batch, dim, dstate, length, groups=groups, seed=7)
    ref, ref_state = selective_scan_ref(**inputs, delta_softplus=True, return_last_state=True)
    with torch.no_grad():
        ours, our_state = selective_scan(**inputs, delta_softplus=True, return_last_state=True)
    assert not ours.requires_grad
    torch.testing.assert_close(ours, ref.detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(our_state, ref_state.detach(), atol=1e-4, rtol=1e-4)


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), dim=st.integers(1, 6), dstate=st.integers(1, 64), length=st.integers(1, 70),
       flags=st.integers(0, 15), seed=st.integers(0, 2**16))
def test_scan_matches_oracle_random_shapes(batch, dim, dstate, length, flags, seed):
    softplus = bool(flags & 8)
    inputs = make_inputs(batch, dim, dstate, length, with_D=bool(flags & 1), with_z=bool(flags & 2),
                         with_bias=bool(flags & 4), softplus=softplus, seed=seed)
    assert_matches_oracle(inputs, delta_softplus=softplus, return_last_state=bool(flags & 1))


def test_scan_keeps_input_dtype_and_last_state_float32():
    inputs = {k: (v.detach().double() if v is not None else None) for k, v in make_inputs(2, 3, 4, 6).items()}
    out, state = selective_scan(**inputs, delta_softplus=True, return_last_state=True)
    assert out.dtype == torch.float64 and out.shape == (2, 3, 6)
    assert state.dtype == torch.float32 and state.shape == (2, 3, 4)


def test_last_state_continues_the_scan():
    """The state after L steps is what the recurrence carries: scanning two halves from it equals the whole."""
    inputs = {k: v.detach() for k, v in make_inputs(1, 2, 3, 10, with_D=False, with_z=False).items() if v is not None}
    _, state = selective_scan(**inputs, delta_softplus=True, return_last_state=True)
    _, ref_state = selective_scan_ref(**inputs, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(state, ref_state, atol=1e-5, rtol=1e-5)
    assert state.abs().sum() > 0


@pytest.mark.parametrize(("change", "error", "match"), [
    ({"u": torch.zeros(2, 3)}, ValueError, "u must be"),
    ({"u": torch.zeros(2, 3, 0), "delta": torch.zeros(2, 3, 0)}, ValueError, "non-empty"),
    ({"delta": torch.zeros(2, 3, 5)}, ValueError, "delta shape"),
    ({"A": torch.zeros(4, 4)}, ValueError, "A must be"),
    ({"B": torch.zeros(2, 5, 6)}, ValueError, "B must be"),
    ({"C": torch.zeros(2, 2, 4, 6)}, ValueError, "C must be"),
    ({"D": torch.zeros(4)}, ValueError, "D must be"),
    ({"z": torch.zeros(2, 3, 7)}, ValueError, "z shape"),
    ({"delta_bias": torch.zeros(3, 1)}, ValueError, "delta_bias must be"),
    ({"u": torch.zeros(2, 3, 6, dtype=torch.int64)}, ValueError, "floating-point"),
    ({"B": torch.zeros(2, 4, 6, dtype=torch.complex64)}, ValueError, "real"),
    ({"C": [[0.0]]}, TypeError, "torch.Tensor"),
    ({"u": torch.zeros(2, 3, 6, device="meta")}, ValueError, "one device"),
])
def test_bad_input_is_a_clear_error(change, error, match):
    inputs = {"u": torch.zeros(2, 3, 6), "delta": torch.zeros(2, 3, 6), "A": -torch.ones(3, 4),
              "B": torch.zeros(2, 4, 6), "C": torch.zeros(2, 4, 6)}
    inputs.update(change)
    with pytest.raises(error, match=match):
        selective_scan(**inputs)


@pytest.mark.gpu
@pytest.mark.skipif(not ssm.mamba_ssm_available(), reason="needs CUDA and mamba_ssm's CUDA kernels")
@pytest.mark.parametrize("groups", [0, 2])
def test_cuda_dispatch_uses_mamba_ssm_and_matches_oracle(groups):
    """mamba_ssm's CUDA kernel against the oracle (on the GPU) and against our CPU scan, at mamba_ssm's own
    float32 tolerances (its tests: rtol 6e-4, atol 2e-3, doubled with z)."""
    cpu_inputs = make_inputs(2, 8, 16, 129, groups=groups)
    cuda_inputs = {k: v.detach().cuda().requires_grad_() for k, v in cpu_inputs.items()}
    out, state = selective_scan(**cuda_inputs, delta_softplus=True, return_last_state=True)
    ref, ref_state = selective_scan_ref(**cuda_inputs, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(out, ref, atol=4e-3, rtol=1.2e-3)
    torch.testing.assert_close(state, ref_state, atol=4e-3, rtol=1.2e-3)
    cpu_out = selective_scan(**cpu_inputs, delta_softplus=True)
    torch.testing.assert_close(out.cpu(), cpu_out, atol=4e-3, rtol=1.2e-3)
    assert_matches_oracle(cuda_inputs, delta_softplus=True, tol=1.2e-3, atol=4e-3)


def test_scan_runs_the_compiled_kernel_here():
    """On a machine with a C compiler (this one, CI) the fast kernel is what selective_scan uses."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine")
    assert ssm._implementation() is scan_kernel.CompiledScan


def test_kernel_is_built_once_into_the_cache(monkeypatch, tmp_path):
    if scan_kernel._compiler() is None:
        pytest.skip("no C compiler on this machine")
    monkeypatch.setenv("MOTION_MAMBA_CACHE", str(tmp_path))
    scan_kernel.build()
    (built,) = (tmp_path / "motion_mamba").glob("scan_kernel_*")
    stamp = built.stat().st_mtime_ns
    scan_kernel.build()
    assert built.stat().st_mtime_ns == stamp and len(list(built.parent.iterdir())) == 1


@pytest.mark.parametrize(("compiler", "reason"), [("no-such-compiler", "no C compiler found"),
                                                  ("false", "compiling the scan kernel failed")])
def test_fallback_to_pytorch_scan_is_logged(monkeypatch, tmp_path, caplog, compiler, reason):
    """No compiler (e.g. a Windows user's Python) or a failing build: a warning, then the PyTorch scan."""
    monkeypatch.setenv("CC", compiler)
    monkeypatch.setenv("MOTION_MAMBA_CACHE", str(tmp_path))
    monkeypatch.setattr(scan_kernel, "load", scan_kernel.build)  # bypass this process's cached build
    with caplog.at_level(logging.WARNING, logger=ssm.__name__):
        impl = ssm._choose_implementation()
    assert impl is ssm._TorchScan
    assert reason in caplog.text and "using the PyTorch scan" in caplog.text


def test_softplus_and_gating_over_extreme_values(implementation):
    """The kernel's own exp/log1p/sigmoid against PyTorch's over the whole range delta and z can take."""
    values = torch.tensor([-80.0, -30.0, -15.0, -5.0, -1e-3, 0.0, 1e-3, 0.7, 5.0, 15.0, 30.0, 80.0])
    inputs = make_inputs(1, 2, 4, values.numel(), seed=7)
    inputs["delta"] = values.repeat(1, 2, 1).requires_grad_()
    inputs["z"] = values.flip(0).repeat(1, 2, 1).requires_grad_()
    inputs["A"] = (inputs["A"].detach() * 0.01).requires_grad_()  # keep exp(delta A) finite over delta = 80
    assert_matches_oracle(inputs, delta_softplus=True)


def test_inference_forward_equals_training_forward(implementation):
    """Under no_grad the kernel skips its checkpoints; the result must not change."""
    inputs = make_inputs(2, 16, 8, 70)
    with torch.no_grad():
        inference = selective_scan(**inputs, delta_softplus=True)
    torch.testing.assert_close(inference, selective_scan(**inputs, delta_softplus=True), atol=0, rtol=0)


@pytest.mark.parametrize("layout", ["channels_last", "every_other_step"])
def test_scan_accepts_strided_layouts(implementation, layout):
    """u, delta, z may be views, e.g. (b, L, d) memory seen as (b, d, L), as the Mamba layer passes them; B and C
    may be views too: the Mamba layer's are slices of its x_proj output (b, L, dt_rank + 2 d_state), read in place
    by the compiled kernel."""
    inputs = make_inputs(2, 32, 4, 23)
    for name in ("u", "delta", "z"):
        values = inputs[name].detach()
        if layout == "channels_last":
            strided = values.transpose(1, 2).contiguous().transpose(1, 2)
        else:
            strided = torch.zeros(*values.shape[:2], 2 * values.shape[2])[..., ::2]
            strided.copy_(values)
        assert not strided.is_contiguous()
        inputs[name] = strided.requires_grad_()
    B, C = inputs["B"].detach(), inputs["C"].detach()  # (b, n, L)
    if layout == "channels_last":  # x_proj's output: [dt (3) | B (n) | C (n)] per step
        projected = torch.cat([torch.randn(2, 23, 3), B.transpose(1, 2), C.transpose(1, 2)], dim=-1)
        B, C = (part.transpose(1, 2) for part in projected.split([3, 4, 4], dim=-1)[1:])
    else:
        B, C = (torch.zeros(2, 4, 2 * 23)[..., ::2].copy_(t) for t in (B, C))
    assert not B.is_contiguous() and not C.is_contiguous()
    inputs["B"], inputs["C"] = B.requires_grad_(), C.requires_grad_()
    assert_matches_oracle(inputs, delta_softplus=True)


def test_contiguous_inputs_give_a_contiguous_output(implementation):
    """As mamba_ssm's: (b, d, L) contiguous in, (b, d, L) contiguous out (other layouts may come back strided)."""
    out = selective_scan(**make_inputs(2, 32, 4, 9), delta_softplus=True)
    assert out.is_contiguous() and out.shape == (2, 32, 9)


def test_multithreaded_scan_matches_oracle(implementation):
    """Enough work to split over threads: tasks sum their partial dB/dC, each writes its own rows."""
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        inputs = make_inputs(3, 64, 16, 200)
        assert scan_kernel._tasks(3 * 64 // 16, 200)[1] == 4
        assert_matches_oracle(inputs, delta_softplus=True, return_last_state=True)
    finally:
        torch.set_num_threads(threads)
