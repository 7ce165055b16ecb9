"""The ``flux2-klein`` policy against diffusers' ``Flux2KleinPipeline`` on tiny random components."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cgrpo.policy import build
from cgrpo.policy.flux2_klein import Flux2KleinPolicy, flux2_reference_ids, flux2_text_ids
from cgrpo.sample import sample
from cgrpo.testing.policies import save_tiny_flux2_klein

PROMPTS = ["a photo of a dog", "a red cube on the beach"]
SIZE = 64  # the pipeline refuses references under 64 px
LAYERS = (0, 1, 2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_flux2_klein(tmp_path_factory.mktemp("klein"), seed=2)


@pytest.fixture(scope="module")
def policy(tiny) -> Flux2KleinPolicy:
    return build("flux2-klein", **tiny, image_size=SIZE)


def _images(count: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(count)]


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


def test_ids():
    ids = flux2_reference_ids([(2, 2), (1, 3)])
    assert ids[:4, 0].tolist() == [10] * 4 and ids[4:, 0].tolist() == [20] * 3
    assert ids[4:, 2].tolist() == [0, 1, 2] and not ids[:, 3].any()
    assert flux2_text_ids(3)[:, 3].tolist() == [0, 1, 2]


def test_conditioning_matches_pipeline(tiny, policy):
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(tiny["path"])
    images = _images(2, 0)  # two references of one subject
    cond = policy.condition(
        PROMPTS, torch.stack([_tensor(i) for i in images])[None].expand(2, -1, -1, -1, -1)
    )
    processed = [pipe.image_processor.preprocess(i, SIZE, SIZE, resize_mode="crop") for i in images]
    with torch.no_grad():
        ref_latents, ref_ids = pipe.prepare_image_latents(processed, 2, None, "cpu", torch.float32)
        embeds, text_ids = pipe.encode_prompt(PROMPTS, max_sequence_length=48, text_encoder_out_layers=LAYERS)
    assert torch.equal(cond.reference_ids, ref_ids[0].float())
    assert (cond.reference_tokens - ref_latents).abs().max() < 1e-5
    assert (cond.prompt_embeds - embeds).abs().max() < 1e-5
    assert torch.equal(cond.text_ids, text_ids[0].float())
    assert cond.pooled_prompt_embeds.shape == (2, 0) and cond.guidance is None


@pytest.mark.parametrize("distilled", [False, True])
def test_sampling_matches_pipeline(tiny, tmp_path, distilled):
    """Two steps from the same noise with two references: sample() == Flux2KleinPipeline (CFG 4 on the base
    model, none on a distilled one)."""
    from diffusers import Flux2KleinPipeline

    options = (
        tiny if not distilled else save_tiny_flux2_klein(tmp_path / "distilled", seed=2, is_distilled=True)
    )
    policy = build("flux2-klein", **options, image_size=SIZE)
    assert policy.cfg_scale == (1.0 if distilled else 4.0)
    pipe = Flux2KleinPipeline.from_pretrained(options["path"])
    refs = _images(2, 3)
    noise = torch.cat([policy.initial_noise(1, torch.Generator().manual_seed(11 + i)) for i in range(2)])
    grid = policy.grid
    with torch.no_grad():
        expected = pipe(
            image=refs,
            prompt=PROMPTS,
            height=SIZE,
            width=SIZE,
            num_inference_steps=2,
            guidance_scale=4.0,
            latents=noise.transpose(1, 2).reshape(2, -1, *grid),  # the pipeline takes [B, C, h, w]
            max_sequence_length=48,
            text_encoder_out_layers=LAYERS,
            output_type="pt",
        ).images
    ours = sample(policy, [refs, refs], PROMPTS, num_steps=2, seed=11, batch_size=2)
    ours = torch.stack([_tensor(i) for i in ours])
    assert (ours - expected).abs().max() <= 0.5 / 255 + 1e-4


def test_grpo_style_velocity_and_lora(tiny, policy):
    trained = build("flux2-klein", **tiny, image_size=SIZE)
    trained.add_lora(rank=4, alpha=4)
    names = [n for n, p in trained.transformer.named_parameters() if p.requires_grad]
    assert any("single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A" in n for n in names)
    assert any("transformer_blocks.0.attn.add_k_proj.lora_B" in n for n in names)
    trained.train()
    references = torch.rand(2, 2, 3, SIZE, SIZE)
    cond = trained.condition(PROMPTS, references).repeat_interleave(2)
    v = trained.velocity(trained.initial_noise(4), torch.full((4,), 0.5), cond)
    assert v.shape == (4, 256, 16) and v.dtype == torch.float32
    v.mean().backward()
    assert all(p.grad is not None for p in trained.trainable_parameters())


def test_defaults_and_persistence(tiny, policy, tmp_path):
    with pytest.raises(ValueError, match="exceed the text encoder"):
        build("flux2-klein", path=tiny["path"])  # Klein's layers 9, 18, 27 on a 2-layer encoder
    default = build("flux2-klein", **tiny)
    assert default.image_size == (512, 512) and default.num_steps == 50 and default.cfg_scale == 4.0
    policy.save_pretrained(tmp_path / "saved")
    loaded = Flux2KleinPolicy.from_pretrained(tmp_path / "saved")
    assert loaded.image_size == (SIZE, SIZE) and loaded.text_encoder.layers == LAYERS
    references, latents = torch.rand(1, 3, SIZE, SIZE), policy.initial_noise(1)
    with torch.no_grad():
        a = policy.velocity(latents, torch.tensor([0.4]), policy.condition(PROMPTS[:1], references))
        b = loaded.velocity(latents, torch.tensor([0.4]), loaded.condition(PROMPTS[:1], references))
    assert torch.equal(a, b)


def test_guidance_override_sets_the_cfg_scale(policy):
    """Klein guides by classifier-free guidance: `cgrpo sample --guidance` sets ``cfg_scale`` for the block
    only, and sampling with it differs from the default scale."""
    from diffusers import Flux2KleinPipeline

    assert policy.pipeline_class is Flux2KleinPipeline  # `cgrpo export` writes Klein's LoRA format
    before = (policy.cfg_scale, policy.guidance)
    with policy.override_guidance(1.5):
        assert (policy.cfg_scale, policy.guidance) == (1.5, before[1])
    assert (policy.cfg_scale, policy.guidance) == before
    refs = _images(1, 4)
    default = _tensor(sample(policy, [refs], PROMPTS[:1], num_steps=2, seed=3)[0])
    weaker = _tensor(sample(policy, [refs], PROMPTS[:1], num_steps=2, seed=3, guidance=1.5)[0])
    assert (default - weaker).abs().max() > 1 / 255 and policy.cfg_scale == before[0]
