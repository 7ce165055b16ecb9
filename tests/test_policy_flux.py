"""The UNO-style FLUX policy: shapes, UnoPE ids, conditioning wiring, codecs, persistence and LoRA."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FluxPipeline

from cgrpo.policy import Conditioning, build
from cgrpo.policy.flux import (
    PixelCodec,
    ReferenceFluxPolicy,
    VaeCodec,
    flux_image_ids,
    pack,
    uno_reference_ids,
    unpack,
)
from cgrpo.sde import flux_sigmas
from cgrpo.testing.policies import tiny_policy_for_tests
from cgrpo.train.sampling import ode_sample

PROMPTS = ["a photo of a red cube", "a blue ball on the left"]


@pytest.fixture(scope="module")
def policy() -> ReferenceFluxPolicy:
    return tiny_policy_for_tests(seed=0)


def _inputs(policy: ReferenceFluxPolicy, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    references = torch.rand(len(PROMPTS), 3, 16, 16, generator=g)
    latents = policy.initial_noise(len(PROMPTS), generator=g)
    sigma = torch.tensor([0.3, 0.8])
    return references, latents, sigma


def test_shapes(policy):
    assert policy.latent_shape == (16, 48)  # 16x16 pixels in 4x4 patches
    references, latents, sigma = _inputs(policy)
    assert latents.shape == (2, 16, 48)
    cond = policy.condition(PROMPTS, references)
    assert cond.prompt_embeds.shape == (2, 8, 32)
    assert cond.pooled_prompt_embeds.shape == (2, 32)
    assert cond.text_ids.shape == (8, 3) and not cond.text_ids.any()
    assert cond.reference_tokens.shape == (2, 16, 48)
    assert cond.reference_ids.shape == (16, 3)
    assert cond.guidance is None
    v = policy.velocity(latents, sigma, cond)
    assert v.shape == latents.shape and v.dtype == torch.float32
    assert policy.encode_images(references).shape == (2, 16, 48)
    assert policy.decode(latents).shape == (2, 3, 16, 16)


def test_image_ids_match_flux_pipeline(policy):
    expected = FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32)
    assert torch.equal(policy.image_ids(), expected)
    assert torch.equal(
        flux_image_ids(3, 5), FluxPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32)
    )


def test_pack_matches_flux_pipeline():
    x = torch.randn(2, 16, 8, 6)
    assert torch.equal(pack(x, 2), FluxPipeline._pack_latents(x, 2, 16, 8, 6))
    assert torch.equal(unpack(pack(x, 2), 8, 6, 2), x)


def test_uno_reference_ids(policy):
    # One reference: the target's grid shifted diagonally by the target's packed (height, width).
    ids = uno_reference_ids((4, 4), [(4, 4)])
    assert torch.equal(ids, flux_image_ids(4, 4) + torch.tensor([0.0, 4.0, 4.0]))
    # Several references continue the offset, each by the previous reference's own grid size.
    ids = uno_reference_ids((4, 6), [(2, 3), (4, 4)])
    assert torch.equal(ids[:6], flux_image_ids(2, 3) + torch.tensor([0.0, 4.0, 6.0]))
    assert torch.equal(ids[6:], flux_image_ids(4, 4) + torch.tensor([0.0, 6.0, 9.0]))
    # Through the policy: [B, K, 3, H, W] references -> K * R tokens with continued ids.
    refs = torch.rand(2, 2, 3, 16, 16)
    tokens, ids = policy.encode_references(refs)
    assert tokens.shape == (2, 32, 48)
    assert torch.equal(ids, uno_reference_ids((4, 4), [(4, 4), (4, 4)]))
    assert torch.equal(tokens[:, 16:], policy.codec.encode(refs[:, 1]))


def test_velocity_depends_on_reference_and_prompt(policy):
    references, latents, sigma = _inputs(policy)
    with torch.no_grad():
        base = policy.velocity(latents, sigma, policy.condition(PROMPTS, references))
        other_ref = policy.velocity(latents, sigma, policy.condition(PROMPTS, references.flip(-1)))
        other_prompt = policy.velocity(
            latents, sigma, policy.condition(["a green star", "at night"], references)
        )
        no_ref = policy.velocity(latents, sigma, policy.condition(PROMPTS, None))
        again = policy.velocity(latents, sigma, policy.condition(PROMPTS, references))
    assert torch.equal(base, again)
    for changed in (other_ref, other_prompt, no_ref):
        assert (changed - base).abs().max() > 1e-4


def test_pixel_codec_round_trip_exact():
    codec = PixelCodec(patch_size=4)
    # Dyadic values (k / 256) survive the [0, 1] <-> [-1, 1] mapping bit-exactly.
    images = torch.randint(0, 257, (2, 3, 16, 24)).float() / 256
    tokens = codec.encode(images)
    assert tokens.shape == (2, 24, 48)
    assert torch.equal(codec.decode(tokens, 16, 24), images)
    assert torch.equal(codec.encode(codec.decode(tokens, 16, 24)), tokens)
    # A token is a 4x4 RGB patch, channel-major like FLUX's packing.
    assert torch.equal(tokens[0, 0].reshape(3, 4, 4), images[0, :, :4, :4] * 2 - 1)


def test_vae_codec_shapes():
    from cgrpo.testing.policies import tiny_flux_vae

    codec = VaeCodec(tiny_flux_vae())
    assert codec.channels == 16 and codec.grid(16, 16) == (4, 4)
    with torch.no_grad():
        tokens = codec.encode(torch.rand(2, 3, 16, 16))
        assert tokens.shape == (2, 16, 16)
        images = codec.decode(tokens, 16, 16)
    assert images.shape == (2, 3, 16, 16) and images.min() >= 0 and images.max() <= 1


def test_save_and_load_pretrained_identical(policy, tmp_path):
    references, latents, sigma = _inputs(policy)
    policy.save_pretrained(tmp_path / "policy")
    for sub in ("transformer", "text_encoder", "tokenizer", "policy.json"):
        assert (tmp_path / "policy" / sub).exists()
    meta = json.loads((tmp_path / "policy" / "policy.json").read_text())
    assert meta["codec"] == "pixel" and meta["patch_size"] == 4 and meta["image_size"] == [16, 16]
    loaded = build("mini", path=tmp_path / "policy")
    assert isinstance(loaded, ReferenceFluxPolicy)
    with torch.no_grad():
        expected = policy.velocity(latents, sigma, policy.condition(PROMPTS, references))
        got = loaded.velocity(latents, sigma, loaded.condition(PROMPTS, references))
    assert torch.equal(expected, got)
    assert not list(tmp_path.glob(".*tmp"))  # the atomic save left no temp directory


def test_mini_without_weights_is_a_clear_error(monkeypatch, tmp_path):
    import cgrpo.policy.mini as mini

    monkeypatch.setattr(mini, "mini_base_path", lambda: None)
    with pytest.raises(FileNotFoundError, match="mini_base"):
        build("mini")
    with pytest.raises(FileNotFoundError, match="transformer/"):
        build("mini", path=tmp_path)


def test_lora(tmp_path):
    policy = tiny_policy_for_tests(seed=1)
    references, latents, sigma = _inputs(policy)
    cond = policy.condition(PROMPTS, references)
    with torch.no_grad():
        base = policy.velocity(latents, sigma, cond)
    policy.add_lora(rank=4, alpha=8)

    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n for n in trainable if "lora_A" in n and "single" in n} >= {
        "transformer.single_transformer_blocks.0.proj_mlp.lora_A.default.weight",
        "transformer.single_transformer_blocks.0.proj_out.lora_A.default.weight",
    }
    assert not any(n.startswith("transformer.proj_out") for n in trainable)  # the final projection stays out
    assert {id(p) for p in policy.trainable_parameters()} == {
        id(p) for p in policy.parameters() if p.requires_grad
    }
    with torch.no_grad():
        assert torch.equal(policy.velocity(latents, sigma, cond), base)  # B = 0: the base policy

    with torch.no_grad():
        for name, param in policy.transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
        tuned = policy.velocity(latents, sigma, cond)
    assert (tuned - base).abs().max() > 1e-4
    policy.save_lora(tmp_path / "lora")
    assert {p.name for p in (tmp_path / "lora").iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }

    fresh = tiny_policy_for_tests(seed=1)
    fresh.load_lora(tmp_path / "lora")
    with torch.no_grad():
        assert torch.equal(fresh.velocity(latents, sigma, fresh.condition(PROMPTS, references)), tuned)

    # save_pretrained keeps base weights and the adapter apart; loading restores both.
    policy.save_pretrained(tmp_path / "with_lora")
    assert (tmp_path / "with_lora" / "lora" / "adapter_model.safetensors").is_file()
    loaded = ReferenceFluxPolicy.from_pretrained(tmp_path / "with_lora")
    assert loaded.has_lora
    with torch.no_grad():
        assert torch.equal(loaded.velocity(latents, sigma, loaded.condition(PROMPTS, references)), tuned)


def test_conditioning_repeat_interleave_and_index(policy):
    references, _, _ = _inputs(policy)
    cond = policy.condition(PROMPTS, references)
    group = cond.repeat_interleave(3)
    assert len(group) == 6
    assert torch.equal(group.prompt_embeds[3], cond.prompt_embeds[1])
    assert torch.equal(group.reference_tokens[2], cond.reference_tokens[0])
    assert torch.equal(group.reference_ids, cond.reference_ids)  # ids are shared, not batched
    part = group.index(slice(2, 4))
    assert len(part) == 2 and torch.equal(part.pooled_prompt_embeds[1], cond.pooled_prompt_embeds[1])
    assert len(Conditioning.cat([cond, part])) == 4


def test_ode_sample(policy):
    sigmas = flux_sigmas(4, shift=1.0)
    assert torch.allclose(sigmas, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    shifted = flux_sigmas(4, shift=3.0)
    assert shifted[0] == 1 and shifted[-1] == 0 and (shifted[1:-1] > sigmas[1:-1]).all()
    references, _, _ = _inputs(policy)
    cond = policy.condition(PROMPTS, references)
    a = ode_sample(
        policy, cond, flux_sigmas(3, shift=1.0), policy.initial_noise(2, torch.Generator().manual_seed(0))
    )
    b = ode_sample(
        policy, cond, flux_sigmas(3, shift=1.0), policy.initial_noise(2, torch.Generator().manual_seed(0))
    )
    assert a.shape == (2, 16, 48) and torch.equal(a, b)


def test_committed_mini_base_loads():
    from cgrpo.policy.mini import mini_base_path

    if mini_base_path() is None:
        pytest.skip("src/cgrpo/assets/mini_base has not been built yet")
    policy = build("mini")
    assert policy.latent_shape == (64, 48) and policy.image_size == (32, 32)
    assert not any(p.requires_grad for p in policy.text_encoder.parameters())
    refs = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        v = policy.velocity(
            policy.initial_noise(1), torch.tensor([0.5]), policy.condition(["a red heart"], refs)
        )
    assert v.shape == (1, 64, 48) and torch.isfinite(v).all()
