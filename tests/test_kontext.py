"""The ``flux-kontext`` policy against diffusers' ``FluxKontextPipeline`` on tiny random components."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cgrpo.policy import build
from cgrpo.policy.flux import flux_image_ids
from cgrpo.policy.kontext import KontextPolicy, kontext_reference_ids
from cgrpo.sample import sample
from cgrpo.testing.policies import save_tiny_kontext

PROMPTS = ["a photo of a dog", "a red cube on the beach"]
SIZE = 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_kontext(tmp_path_factory.mktemp("kontext"), seed=1)


@pytest.fixture(scope="module")
def policy(tiny) -> KontextPolicy:
    # References kept at SIZE (the pipeline's `_auto_resize=False` path): the pipeline's default ~1 MP
    # preferred resolution is far too slow for tiny CPU models; test_prepare_references_* checks it.
    return build("flux-kontext", **tiny, image_size=SIZE, reference_size=SIZE)


def _reference_images(seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in PROMPTS]


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


def test_reference_ids_are_kontexts():
    ids = kontext_reference_ids([(2, 3)])
    expected = flux_image_ids(2, 3)
    expected[:, 0] = 1
    assert torch.equal(ids, expected)
    two = kontext_reference_ids([(2, 3), (2, 3)])
    assert torch.equal(two[6:, 2], expected[:, 2] + 3) and (two[:, 0] == 1).all()


def test_velocity_matches_pipeline_inputs(tiny, policy):
    """Our conditioning equals what FluxKontextPipeline.prepare_latents builds (latents and ids)."""
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline.from_pretrained(tiny["flux_path"])
    images = _reference_images()
    pixels = torch.stack([_tensor(i) for i in images])
    cond = policy.condition(PROMPTS, pixels)
    processed = pipe.image_processor.preprocess(images, SIZE, SIZE)
    noise, image_latents, latent_ids, image_ids = pipe.prepare_latents(
        processed, 2, 4, SIZE, SIZE, torch.float32, "cpu", None, policy.initial_noise(2)
    )
    assert torch.equal(policy.image_ids(), latent_ids)
    assert torch.equal(cond.reference_ids, image_ids)
    assert (cond.reference_tokens - image_latents).abs().max() < 1e-5
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, PROMPTS, max_sequence_length=16)
    assert (cond.prompt_embeds - embeds).abs().max() < 1e-5
    assert (cond.pooled_prompt_embeds - pooled).abs().max() < 1e-5
    assert torch.equal(cond.text_ids, text_ids)
    assert cond.guidance.tolist() == [2.5, 2.5]


def test_sampling_matches_pipeline(tiny, policy):
    """Two Euler steps from the same noise: our sample() equals FluxKontextPipeline's images."""
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline.from_pretrained(tiny["flux_path"])
    images = _reference_images(1)
    noise = torch.cat([policy.initial_noise(1, torch.Generator().manual_seed(7 + i)) for i in range(2)])
    with torch.no_grad():
        expected = pipe(
            image=images,
            prompt=PROMPTS,
            height=SIZE,
            width=SIZE,
            max_area=SIZE * SIZE,
            num_inference_steps=2,
            guidance_scale=2.5,
            latents=noise,
            max_sequence_length=16,
            output_type="pt",
            _auto_resize=False,
        ).images
    ours = sample(policy, images, PROMPTS, num_steps=2, seed=7, batch_size=2)
    ours = torch.stack([_tensor(i) for i in ours])
    # uint8 rounding of ours: at most half a level apart.
    assert (ours - expected).abs().max() <= 0.5 / 255 + 1e-4


def test_defaults(tiny):
    from cgrpo.sde import flux_sigmas

    policy = build("flux-kontext", **tiny)
    assert policy.image_size == (512, 512) and policy.num_steps == 28 and policy.guidance == 2.5
    assert torch.equal(policy.sigmas(), flux_sigmas(28, image_seq_len=128 * 128))  # tiny VAE: /4 tokens


def test_grpo_style_velocity_call(tiny):
    policy = build("flux-kontext", **tiny, image_size=SIZE, reference_size=SIZE)
    policy.add_lora(rank=4, alpha=4)
    policy.train()
    references = torch.rand(2, 3, SIZE, SIZE)
    cond = policy.condition(PROMPTS, references).repeat_interleave(3)  # a group of G = 3 per pair
    latents = policy.initial_noise(6)
    v = policy.velocity(latents, torch.full((6,), 0.6), cond)
    assert v.shape == (6, 64, 16) and v.dtype == torch.float32
    v.mean().backward()
    assert all(p.grad is not None for p in policy.trainable_parameters())
