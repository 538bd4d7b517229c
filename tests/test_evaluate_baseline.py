"""The MLD-style transformer baseline: registered in the denoiser factory, padding-safe, budget-matched."""

import pytest
import torch

from backend.checkpoint import read_config_file
from backend.models.denoiser import build_denoiser

TEXT_DIM = 384


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _inputs(batch: int = 2, tokens: int = 10, latent: int = 4, words: int = 6):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, tokens, latent, generator=g)
    t = torch.tensor([3, 700][:batch])
    text = torch.randn(batch, words, TEXT_DIM, generator=g)
    text_mask = torch.ones(batch, words, dtype=torch.bool)
    pooled = torch.randn(batch, TEXT_DIM, generator=g)
    return x, t, text, text_mask, pooled


@pytest.mark.parametrize(
    ("baseline", "mamba"),
    [("mld_transformer", "default"), ("mld_transformer_tiny", "tiny"), ("bandai_cpu_mld", "bandai_cpu")],
)
def test_baseline_config_matches_the_mamba_config_but_for_the_denoiser(baseline, mamba):
    a, b = read_config_file(baseline), read_config_file(mamba)
    assert a["denoiser"]["arch"] == "mld_transformer"
    for key in set(a) | set(b):
        if key not in ("name", "denoiser"):
            assert a.get(key) == b.get(key), f"{baseline}.json and {mamba}.json differ in {key!r}"
    latent = b["vae"]["latent_dim"]
    n_base = _params(build_denoiser(a["denoiser"], latent, TEXT_DIM))
    n_mamba = _params(build_denoiser(b["denoiser"], latent, TEXT_DIM))
    print(f"{baseline}: {n_base:,} parameters; {mamba} Motion Mamba denoiser: {n_mamba:,}")
    assert abs(n_base / n_mamba - 1) < 0.05


def test_baseline_output_shape_and_padding_invariance():
    model = build_denoiser(read_config_file("mld_transformer_tiny")["denoiser"], 4, TEXT_DIM).eval()
    torch.nn.init.normal_(model.out.weight)  # the zero-initialised head would hide everything
    x, t, text, text_mask, pooled = _inputs()
    text_mask[1, 3:] = False
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 7:] = False
    with torch.no_grad():
        out = model(x, t, text, text_mask, pooled, None, mask)
        alone = model(x[1:, :7], t[1:], text[1:, :3], text_mask[1:, :3], pooled[1:])
    assert out.shape == x.shape
    torch.testing.assert_close(out[1, :7], alone[0], atol=1e-5, rtol=1e-4)


def test_baseline_uses_text_and_drop_swaps_it_out():
    model = build_denoiser(read_config_file("mld_transformer_tiny")["denoiser"], 4, TEXT_DIM).eval()
    torch.nn.init.normal_(model.out.weight)
    x, t, text, text_mask, pooled = _inputs()
    with torch.no_grad():
        out = model(x, t, text, text_mask, pooled)
        other_text = model(x, t, text.flip(0), text_mask, pooled.flip(0))
        dropped = model(x, t, text, text_mask, pooled, torch.tensor([True, False]))
    assert (out - other_text).abs().max() > 1e-3
    torch.testing.assert_close(dropped[1], out[1])
    assert (dropped[0] - out[0]).abs().max() > 1e-3


def test_baseline_learns_a_fixed_batch():
    torch.manual_seed(0)
    model = build_denoiser(read_config_file("mld_transformer_tiny")["denoiser"] | {"dropout": 0.0}, 4, TEXT_DIM)
    x, t, text, text_mask, pooled = _inputs()
    target = torch.randn_like(x)
    drop = torch.tensor([True, False])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = (model(x, t, text, text_mask, pooled, drop) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(p.grad is not None for p in model.parameters())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("bad", [{"layers": 4}, {"layers": 0}, {"d_model": 30, "heads": 4}])
def test_bad_baseline_config_is_a_value_error(bad):
    config = read_config_file("mld_transformer_tiny")["denoiser"] | bad
    with pytest.raises(ValueError):
        build_denoiser(config, 4, TEXT_DIM)
