"""The model parts on their own: motion VAE, Motion Mamba U-Net, diffusion schedule/DDIM, text encoder."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backend.models import vae as vae_module
from backend.models.consistency import consistency_x0, fast_schedule, lcm_timesteps
from backend.models.denoiser import DENOISERS, build_denoiser, register_denoiser
from backend.models.diffusion import Diffusion
from backend.models.text_encoder import TextEncoder, native_bert_layers
from backend.models.vae import MotionVAE

UNET = {"arch": "motion_mamba", "dims": [16, 24, 32], "scans": [2, 1, 1], "groups": 4, "heads": 2, "d_state": 4}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _randomize(module: nn.Module) -> nn.Module:
    """Give the zero-initialised FiLM / output layers weights, so every path carries signal in a test."""
    torch.manual_seed(1)
    for p in module.parameters():
        if p.dim() >= 1 and torch.count_nonzero(p) == 0:
            nn.init.normal_(p, std=0.2)
    return module


@pytest.fixture(scope="module")
def vae() -> MotionVAE:
    torch.manual_seed(0)
    return MotionVAE(latent_dim=4, width=16, d_state=4).eval()


def test_vae_latent_is_temporal_quarter_length(vae):
    x = torch.randn(2, 40, 263)
    mu, logvar = vae.encode(x)
    assert mu.shape == logvar.shape == (2, 10, 4)
    assert vae.decode(mu).shape == (2, 40, 263)
    with pytest.raises(ValueError, match="multiple of 4"):
        vae.encode(torch.randn(1, 42, 263))


@torch.no_grad()
@pytest.mark.parametrize("layers", [1, 2])
def test_vae_decoder_is_causal_with_one_token_of_lookahead(layers):
    """A prefix of the latent decodes to the whole latent's frames (what makes a stream exact), also with two
    Mamba layers per resolution (the decoder scans forwards only, the encoder alternates): changing token k
    changes frames from 4 (k - 1) on, never before (the up-convolutions read one token ahead: ``LOOKAHEAD``)."""
    torch.manual_seed(0)
    vae = MotionVAE(latent_dim=4, width=16, d_state=4, layers=layers).eval()
    z = torch.randn(2, 9, 4)
    whole = vae.decode(z)
    assert whole.shape == (2, 36, 263)
    for stop in range(1, 10):
        torch.testing.assert_close(vae.decode(z, stop), whole[:, : 4 * stop], rtol=1e-5, atol=1e-6)
    for k in (3, 8):
        changed = z.clone()
        changed[:, k] += 3.0
        moved = (vae.decode(changed) - whole).abs().amax(dim=(0, 2)) > 1e-6
        assert not moved[: 4 * (k - vae_module.LOOKAHEAD)].any() and moved[4 * (k - 1): 4 * k].any()
    x = torch.randn(1, 36, 263)  # with two layers the encoder sees both ways: a late frame moves the first token
    later = x.clone()
    later[:, -1] += 3.0
    assert torch.allclose(vae.encode(x)[0][:, 0], vae.encode(later)[0][:, 0]) == (layers == 1)
    with pytest.raises(ValueError, match=r"stop must be in 1\.\.9"):
        vae.decode(z, 0)


@torch.no_grad()
def test_vae_decodes_samples_in_calls_of_bounded_frames(vae, monkeypatch):
    z = torch.randn(3, 10, 4)
    together = vae.decode(z)
    monkeypatch.setattr(vae_module, "DECODE_FRAMES", 50)  # 40 frames per sample: one sample a call
    torch.testing.assert_close(vae.decode(z), together, rtol=1e-5, atol=1e-6)


def test_vae_loss_backpropagates(vae):
    vae.train()
    x = torch.randn(2, 16, 263)
    losses = vae(x, kl_weight=1e-4, acc_weight=2.0)
    assert set(losses) == {"loss", "recon", "vel", "acc", "kl"}
    parts = losses["recon"] + losses["vel"] + 2.0 * losses["acc"] + 1e-4 * losses["kl"]
    assert torch.allclose(losses["loss"], parts)
    losses["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in vae.parameters())
    vae.zero_grad()
    vae.eval()


def _text(b: int, s: int = 5, d: int = 12):
    torch.manual_seed(2)
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[0, 3:] = False
    return torch.randn(b, s, d), mask, torch.randn(b, d)


@torch.no_grad()
def test_unet_shapes_and_odd_lengths():
    net = _randomize(build_denoiser(UNET, 4, 12)).eval()
    tokens, mask, pooled = _text(2)
    for n in (1, 7, 13, 50):
        out = net(torch.randn(2, n, 4), torch.tensor([3, 900]), tokens, mask, pooled)
        assert out.shape == (2, n, 4) and torch.isfinite(out).all()


@torch.no_grad()
def test_unet_padding_mask_matches_unpadded():
    net = _randomize(build_denoiser(UNET, 4, 12)).eval()
    tokens, mask, pooled = _text(2)
    x = torch.randn(2, 21, 4)
    t = torch.tensor([10, 500])
    valid = torch.ones(2, 21, dtype=torch.bool)
    valid[1, 13:] = False
    padded = net(x, t, tokens, mask, pooled, mask=valid)
    alone = net(x[1:, :13], t[1:], tokens[1:], mask[1:], pooled[1:])
    assert torch.allclose(padded[1, :13], alone[0], atol=1e-5)
    assert torch.allclose(padded[0], net(x[:1], t[:1], tokens[:1], mask[:1], pooled[:1])[0], atol=1e-5)


@torch.no_grad()
def test_unet_condition_dropout_uses_the_null_text():
    net = _randomize(build_denoiser(UNET, 4, 12)).eval()
    tokens, mask, pooled = _text(2)
    x, t = torch.randn(2, 8, 4), torch.tensor([100, 100])
    drop = torch.tensor([True, True])
    a = net(x, t, tokens, mask, pooled, drop)
    b = net(x, t, torch.randn_like(tokens), mask, torch.randn_like(pooled), drop)
    assert torch.allclose(a, b, atol=1e-6)  # dropped: the text makes no difference
    assert not torch.allclose(a, net(x, t, tokens, mask, pooled), atol=1e-4)


def test_unet_zero_initialised_output_and_all_parameters_trained():
    net = build_denoiser(UNET, 4, 12)
    tokens, mask, pooled = _text(2)
    out = net(torch.randn(2, 8, 4), torch.tensor([1, 2]), tokens, mask, pooled, torch.tensor([False, True]))
    assert torch.count_nonzero(out) == 0
    out.sum().backward()  # every parameter is in the graph (DDP needs no find_unused_parameters)
    assert all(p.grad is not None for p in net.parameters())


def test_denoiser_factory_registry():
    with pytest.raises(ValueError, match="unknown denoiser arch 'nope'"):
        build_denoiser({"arch": "nope"}, 4, 12)
    with pytest.raises(ValueError, match="equally long"):
        build_denoiser({**UNET, "scans": [1]}, 4, 12)

    @register_denoiser("test_linear")
    class Linear(nn.Module):
        def __init__(self, config, latent_dim, text_dim):
            super().__init__()
            self.config = config

    try:
        assert isinstance(build_denoiser({"arch": "test_linear"}, 4, 12), Linear)
    finally:
        DENOISERS.pop("test_linear")


def test_a_denoiser_dict_is_read_into_its_typed_section():
    with pytest.raises(ValueError, match=r"denoiser: unknown key 'grups'"):  # once silently ignored
        build_denoiser({**UNET, "grups": 2}, 4, 12)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_diffusion_target_inverts(prediction):
    diff = Diffusion(prediction=prediction)
    x0, noise = torch.randn(4, 6, 3), torch.randn(4, 6, 3)
    t = torch.tensor([0, 10, 500, 999])
    xt = diff.add_noise(x0, noise, t)
    x0_hat, eps_hat = diff.split(diff.target(x0, noise, t), xt, t)
    assert torch.allclose(x0_hat, x0, atol=1e-4) and torch.allclose(eps_hat, noise, atol=1e-4)


@pytest.mark.parametrize("schedule", ["scaled_linear", "linear", "cosine"])
def test_ddim_with_an_oracle_lands_on_the_data(schedule):
    diff = Diffusion(beta_schedule=schedule, prediction="v")
    x0 = torch.randn(2, 5, 3)

    def oracle(x, t):  # knows x0: returns the exact target for the current x_t
        sa, sb = diff._coefs(t, x)
        return diff.target(x0, (x - sa * x0) / sb, t)

    ts = diff.ddim_timesteps(7)
    out = torch.randn(2, 5, 3)
    for i, t in enumerate(ts):  # the loop MotionPipeline runs: a scheduler step per timestep
        out = diff.ddim_step(oracle(out, torch.full((2,), t)), out, t, ts[i + 1] if i + 1 < len(ts) else None)
    assert torch.allclose(out, x0, atol=1e-4)
    assert ts[0] == 999 and len(set(ts)) == 7 and ts == sorted(ts, reverse=True)


def test_diffusion_bad_arguments():
    with pytest.raises(ValueError, match="prediction"):
        Diffusion(prediction="x")
    with pytest.raises(ValueError, match="beta_schedule"):
        Diffusion(beta_schedule="sigmoid")
    with pytest.raises(ValueError, match="steps"):
        Diffusion().ddim_timesteps(0)


def test_text_encoder_offline_minilm(tmp_path):
    enc = TextEncoder(cache_size=2)
    assert enc.dim == 384 and enc.name == "all-MiniLM-L6-v2"
    captions = ["a person walks forward", "someone waves the right hand energetically"]
    batch = enc(captions)
    assert batch.tokens.shape[0] == 2 and batch.tokens.shape[2] == 384
    assert batch.mask[0].sum() < batch.mask[1].sum()  # shorter caption, padded
    assert torch.allclose(batch.pooled.norm(dim=-1), torch.ones(2), atol=1e-5)
    again = enc(captions[::-1])  # from the cache, other order
    assert torch.equal(again.pooled, batch.pooled.flip(0))
    enc(["a third caption"])  # the least recently used one leaves a full cache
    assert list(enc._cache) == [captions[0], "a third caption"]
    assert not any(p.requires_grad for p in enc.parameters())
    similar = float(enc(["a man walks"]).pooled @ enc(["a person is walking"]).pooled.T)
    unrelated = float(enc(["a man walks"]).pooled @ enc(["the stock market fell"]).pooled.T)
    assert similar > unrelated + 0.2
    with pytest.raises(FileNotFoundError, match="no Hugging Face text encoder"):
        TextEncoder(tmp_path)


def test_text_encoder_runs_bert_as_native_layers_with_hugging_faces_numbers():
    """The shipped encoder runs its BERT layers as torch's TransformerEncoderLayers: the token states of a padded
    batch and of single captions are Hugging Face's own forward's (same weights) to float tolerance; models the
    conversion does not cover (relative positions, another activation) keep Hugging Face's layers."""
    from transformers import AutoModel, BertConfig, BertModel

    from backend.models.text_encoder import default_encoder_path

    enc = TextEncoder(cache_size=0)
    assert enc.native_layers is not None and len(enc.native_layers) == 6
    reference = AutoModel.from_pretrained(default_encoder_path(), local_files_only=True).eval()
    captions = ["walk", "a person jumps up and down three times, then sits on the floor and waves both hands", "hi"]
    tokens = enc.tokenizer(captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = reference(**tokens).last_hidden_state
        batch = enc(captions)
        for i, caption in enumerate(captions):
            valid = tokens["attention_mask"][i].bool()
            torch.testing.assert_close(batch.tokens[i, : int(valid.sum())], expected[i, valid], atol=1e-5, rtol=0)
            torch.testing.assert_close(enc([caption]).tokens[0], expected[i, valid], atol=1e-5, rtol=0)
    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    assert native_bert_layers(BertModel(BertConfig(**small))) is not None
    assert native_bert_layers(BertModel(BertConfig(**small, position_embedding_type="relative_key"))) is None
    assert native_bert_layers(BertModel(BertConfig(**small, hidden_act="relu"))) is None


def test_consistency_sampler_schedule_and_boundary():
    assert lcm_timesteps(1, 20, 1000) == [999]
    assert lcm_timesteps(2, 20, 1000) == [999, 499]
    assert lcm_timesteps(4, 20, 1000) == [999, 759, 519, 279]
    assert lcm_timesteps(50, 20, 1000) == list(range(999, 0, -20))
    for bad in (0, 51):
        with pytest.raises(ValueError, match=r"takes 1\.\.50 steps"):
            lcm_timesteps(bad, 20, 1000)
    # the fast sampler: the student's own steps, or its one step refined by the teacher's DDIM from refine_from
    assert fast_schedule(4, 20, 1000) == [(t, True) for t in lcm_timesteps(4, 20, 1000)]
    assert fast_schedule(1, 20, 1000, refine_from=200) == [(999, True)]
    assert fast_schedule(2, 20, 1000, refine_from=200) == [(999, True), (200, False)]
    assert fast_schedule(4, 20, 1000, refine_from=200) == [(999, True), (200, False), (133, False), (67, False)]
    for bad in (-5, 1000):
        with pytest.raises(ValueError, match=r"refine_from must be a timestep in 1\.\.999"):
            fast_schedule(2, 20, 1000, refine_from=bad)
    with pytest.raises(ValueError, match="at least 1 step"):
        fast_schedule(0, 20, 1000, refine_from=200)
    diff = Diffusion()
    x, eps = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    # at t = 0 the consistency function is the identity (its boundary condition), whatever the network says
    assert torch.equal(consistency_x0(diff, eps, x, torch.zeros(3, dtype=torch.long)), x)
    # high in the schedule it is the network's clean-latent estimate
    t = torch.full((3,), 999)
    torch.testing.assert_close(consistency_x0(diff, eps, x, t), diff.split(eps, x, t)[0], rtol=1e-4, atol=1e-4)


