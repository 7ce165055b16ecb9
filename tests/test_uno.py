"""The ``uno`` policy on tiny random FLUX components saved in the diffusers layout.

The central check is an independent forward pass written here from UNO's description (its BFL-layout
``Flux.forward`` with ``DoubleStreamBlockLoraProcessor`` / ``SingleStreamBlockLoraProcessor``): fused qkv
projections with the fused LoRA added, reference tokens packed with UNO's rearrange and appended to the image
stream, UnoPE ids shifted diagonally, text first in the joint attention, and only the first N outputs kept.
It reuses only the tiny transformer's weights (and its embedding/MLP sub-modules), not its attention code.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cgrpo.policy import build
from cgrpo.policy.flux import reference_list
from cgrpo.policy.flux_backbone import resize_references
from cgrpo.policy.uno import UnoPolicy, uno_shift, uno_sigmas
from cgrpo.policy.uno_lora import (
    convert_uno_lora,
    is_uno_lora,
    load_uno_lora_file,
    random_uno_lora,
    save_uno_lora_as_diffusers,
    uno_lora_rank,
)
from cgrpo.testing.policies import TINY_FLUX_TRANSFORMER, save_tiny_uno

PROMPTS = ["a photo of a dog", "a red cube on the beach"]
SIZE = 32  # 32 px -> 16 x 16 latents (tiny VAE, /2) -> 8 x 8 = 64 packed tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_uno(tmp_path_factory.mktemp("uno"), seed=0, lora_rank=4)


@pytest.fixture(scope="module")
def policy(tiny) -> UnoPolicy:
    return build("uno", **tiny, image_size=SIZE)


def _inputs(k: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    references = torch.rand(len(PROMPTS), k, 3, SIZE, SIZE, generator=g)
    latents = torch.randn(len(PROMPTS), 64, 16, generator=g)
    sigma = torch.tensor([0.9, 0.35])
    return (references[:, 0] if k == 1 else references), latents, sigma


# --- an independent UNO forward (BFL layout, fused qkv LoRA) ---------------------------------------------


def _rope(ids: torch.Tensor, axes: tuple[int, ...], theta: float = 10000.0):
    angles = []
    for axis, dim in enumerate(axes):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles.append(ids[:, axis].double()[:, None] * omega[None])
    angle = torch.cat(angles, dim=-1)
    return angle.cos().float(), angle.sin().float()


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # BFL: each consecutive pair (x_{2i}, x_{2i+1}) is rotated by its angle.
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _ln(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _fused(x, layers, lora=None):
    """``[q | k | v]`` of one fused linear, as BFL's ``qkv``, plus UNO's fused LoRA ``up(down(x))``."""
    weight = torch.cat([layer.weight for layer in layers])
    bias = torch.cat([layer.bias for layer in layers])
    out = F.linear(x, weight, bias)
    if lora is not None:
        out = out + (x @ lora["down"].T) @ lora["up"].T
    return out


def _plus_lora(out, x, lora):
    return out if lora is None else out + (x @ lora["down"].T) @ lora["up"].T


def _heads(qkv: torch.Tensor, heads: int):
    b, length, _ = qkv.shape
    return qkv.view(b, length, 3, heads, -1).permute(2, 0, 3, 1, 4)  # "B L (K H D) -> K B H L D"


def _attention(q, k, v, cos, sin):
    q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


def uno_reference_forward(model, latents, sigma, text, pooled, guidance, reference_images, vae, lora):
    """UNO's forward for latents ``[B, N, C]`` and reference images ``[B, K, 3, H, W]`` in [0, 1]."""
    heads = model.config.num_attention_heads
    b, n, _ = latents.shape
    grid = int(math.isqrt(n))
    # References: VAE posterior mean, (z - shift) * scale, "b c (h ph) (w pw) -> b (h w) (c ph pw)".
    refs, ref_ids = [], []
    shift_h, shift_w = grid, grid
    for k in range(reference_images.shape[1]):
        z = vae.encode(reference_images[:, k] * 2 - 1).latent_dist.mode()
        z = (z - vae.config.shift_factor) * vae.config.scaling_factor
        c, h, w = z.shape[1:]
        refs.append(z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * 4))
        ids = torch.zeros(h // 2, w // 2, 3)
        ids[..., 1] = torch.arange(h // 2)[:, None] + shift_h
        ids[..., 2] = torch.arange(w // 2)[None, :] + shift_w
        ref_ids.append(ids.reshape(-1, 3))
        shift_h, shift_w = shift_h + h // 2, shift_w + w // 2
    img_ids = torch.zeros(grid, grid, 3)
    img_ids[..., 1] = torch.arange(grid)[:, None]
    img_ids[..., 2] = torch.arange(grid)[None, :]
    ids = torch.cat([torch.zeros(text.shape[1], 3), img_ids.reshape(-1, 3), *ref_ids])
    cos, sin = _rope(ids, model.config.axes_dims_rope)

    img = model.x_embedder(torch.cat([latents, *refs], dim=1))
    vec = model.time_text_embed(sigma * 1000, guidance * 1000, pooled)
    txt = model.context_embedder(text)
    length = txt.shape[1]
    for i, block in enumerate(model.transformer_blocks):
        lo = {name: lora.get(f"double_blocks.{i}.{name}") for name in ("qkv1", "proj1", "qkv2", "proj2")}
        s1, c1, g1, s2, c2, g2 = block.norm1.linear(F.silu(vec))[:, None].chunk(6, dim=-1)
        ts1, tc1, tg1, ts2, tc2, tg2 = block.norm1_context.linear(F.silu(vec))[:, None].chunk(6, dim=-1)
        attn = block.attn
        img_mod = (1 + c1) * _ln(img) + s1
        iq, ik, iv = _heads(_fused(img_mod, [attn.to_q, attn.to_k, attn.to_v], lo["qkv1"]), heads)
        txt_mod = (1 + tc1) * _ln(txt) + ts1
        tq, tk, tv = _heads(
            _fused(txt_mod, [attn.add_q_proj, attn.add_k_proj, attn.add_v_proj], lo["qkv2"]), heads
        )
        q = torch.cat([_rms(tq, attn.norm_added_q.weight), _rms(iq, attn.norm_q.weight)], dim=2)
        k = torch.cat([_rms(tk, attn.norm_added_k.weight), _rms(ik, attn.norm_k.weight)], dim=2)
        out = _attention(q, k, torch.cat([tv, iv], dim=2), cos, sin)
        txt_attn, img_attn = out[:, :length], out[:, length:]
        img = img + g1 * _plus_lora(attn.to_out[0](img_attn), img_attn, lo["proj1"])
        img = img + g2 * block.ff((1 + c2) * _ln(img) + s2)
        txt = txt + tg1 * _plus_lora(attn.to_add_out(txt_attn), txt_attn, lo["proj2"])
        txt = txt + tg2 * block.ff_context((1 + tc2) * _ln(txt) + ts2)
    x = torch.cat([txt, img], dim=1)
    for i, block in enumerate(model.single_transformer_blocks):
        lo = {name: lora.get(f"single_blocks.{i}.{name}") for name in ("qkv", "proj")}
        shift, scale, gate = block.norm.linear(F.silu(vec))[:, None].chunk(3, dim=-1)
        x_mod = (1 + scale) * _ln(x) + shift
        attn = block.attn
        q, k, v = _heads(_fused(x_mod, [attn.to_q, attn.to_k, attn.to_v], lo["qkv"]), heads)
        attn_out = _attention(_rms(q, attn.norm_q.weight), _rms(k, attn.norm_k.weight), v, cos, sin)
        hidden = torch.cat([attn_out, F.gelu(block.proj_mlp(x_mod), approximate="tanh")], dim=-1)
        x = x + gate * _plus_lora(block.proj_out(hidden), hidden, lo["proj"])
    img = x[:, length:][:, :n]
    return model.proj_out(model.norm_out(img, vec))


def _grouped_lora(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    names = {"qkv_lora1": "qkv1", "proj_lora1": "proj1", "qkv_lora2": "qkv2", "proj_lora2": "proj2"}
    names.update({"qkv_lora": "qkv", "proj_lora": "proj"})
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        block, index, _, layer, part, _ = key.split(".")
        out.setdefault(f"{block}.{index}.{names[layer]}", {})[part] = value
    return out


def _fresh_base(tiny):
    """The tiny FLUX transformer and VAE exactly as saved (no LoRA)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    base = tiny["flux_path"]
    return (
        FluxTransformer2DModel.from_pretrained(base, subfolder="transformer").eval(),
        AutoencoderKL.from_pretrained(base, subfolder="vae").eval(),
    )


# --- tests --------------------------------------------------------------------------------------------------


def test_convert_uno_lora_is_the_exact_split():
    state = random_uno_lora(TINY_FLUX_TRANSFORMER, rank=3, seed=1)
    assert is_uno_lora(state) and uno_lora_rank(state) == 3
    converted = convert_uno_lora(state)
    # 1 double block: 3 + 3 qkv targets + 2 projections; 1 single block: 3 qkv targets + proj_out.
    assert len(converted) == 2 * (8 + 4)
    down = state["double_blocks.0.processor.qkv_lora1.down.weight"]
    up = state["double_blocks.0.processor.qkv_lora1.up.weight"]
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        a = converted[f"transformer_blocks.0.attn.{name}.lora_A.weight"]
        b = converted[f"transformer_blocks.0.attn.{name}.lora_B.weight"]
        assert torch.equal(a, down) and torch.equal(b, up[32 * i : 32 * (i + 1)])
    fused_delta = up @ down
    split_delta = torch.cat(
        [
            converted[f"transformer_blocks.0.attn.{n}.lora_B.weight"]
            @ converted[f"transformer_blocks.0.attn.{n}.lora_A.weight"]
            for n in ("to_q", "to_k", "to_v")
        ]
    )
    assert torch.equal(split_delta, fused_delta)  # bit-exact: the same products, row by row
    assert converted["single_transformer_blocks.0.proj_out.lora_A.weight"].shape == (3, 32 + 128)
    assert "transformer_blocks.0.attn.to_add_out.lora_B.weight" in converted
    scaled = convert_uno_lora(state, scale=0.5)
    assert torch.equal(scaled["transformer_blocks.0.attn.to_q.lora_B.weight"], up[:32] * 0.5)


def test_convert_rejects_foreign_keys(tmp_path):
    with pytest.raises(ValueError, match="not a UNO LoRA"):
        convert_uno_lora({"transformer.blocks.0.lora_A.weight": torch.zeros(2, 2)})
    state = random_uno_lora(TINY_FLUX_TRANSFORMER, rank=2)
    del state["double_blocks.0.processor.qkv_lora1.up.weight"]
    with pytest.raises(ValueError, match="lacks its down or up"):
        convert_uno_lora(state)
    with pytest.raises(FileNotFoundError, match="dit_lora"):
        load_uno_lora_file(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("num_references", [1, 2])
def test_policy_matches_independent_uno_forward(tiny, policy, num_references):
    """Merged UNO LoRA + UnoPE layout == the fused-layout reference forward (one and two references)."""
    references, latents, sigma = _inputs(k=num_references)
    transformer, vae = _fresh_base(tiny)
    lora = _grouped_lora(load_uno_lora_file(tiny["lora_path"]))
    with torch.no_grad():
        cond = policy.condition(PROMPTS, references)
        ours = policy.velocity(latents, sigma, cond)
        # UNO sizes several references down (0.625); that resize is preprocessing, not the layout under test.
        refs = torch.stack(policy.preprocess_references(reference_list(references)), dim=1)
        expected = uno_reference_forward(
            transformer,
            latents,
            sigma,
            cond.prompt_embeds,
            cond.pooled_prompt_embeds,
            torch.full((2,), 4.0),
            refs,
            vae,
            lora,
        )
        without_lora = uno_reference_forward(
            transformer,
            latents,
            sigma,
            cond.prompt_embeds,
            cond.pooled_prompt_embeds,
            torch.full((2,), 4.0),
            refs,
            vae,
            {},
        )
    diff = (ours - expected).abs().max().item()
    assert diff < 1e-5, diff
    assert (ours - without_lora).abs().max() > 1e-3  # the LoRA matters at this scale
    assert cond.reference_tokens.shape == (2, 64 if num_references == 1 else 2 * 25, 16)


def test_adapter_mode_and_diffusers_loaders_agree(tiny, policy):
    """The same UNO LoRA through (a) a peft adapter, (b) diffusers' own xlabs converter in
    ``FluxPipeline.load_lora_weights`` and (c) our diffusers-format file, all equal the merged policy."""
    from diffusers import FluxPipeline

    references, latents, sigma = _inputs()
    with torch.no_grad():
        cond = policy.condition(PROMPTS, references)
        merged = policy.velocity(latents, sigma, cond)
        adapter_policy = build("uno", **tiny, image_size=SIZE, uno_lora_mode="adapter")
        assert "uno" in adapter_policy.transformer.peft_config
        via_adapter = adapter_policy.velocity(latents, sigma, cond)
    assert (via_adapter - merged).abs().max() < 1e-5
    assert not any(p.requires_grad for p in adapter_policy.parameters())

    def pipeline_velocity(pipe) -> torch.Tensor:
        hidden = torch.cat([latents, cond.reference_tokens], dim=1)
        ids = torch.cat([policy.image_ids(), cond.reference_ids])
        with torch.no_grad():
            out = pipe.transformer(
                hidden_states=hidden,
                encoder_hidden_states=cond.prompt_embeds,
                pooled_projections=cond.pooled_prompt_embeds,
                timestep=sigma,
                img_ids=ids,
                txt_ids=cond.text_ids,
                guidance=cond.guidance,
                return_dict=False,
            )[0]
        return out[:, : latents.shape[1]]

    raw = FluxPipeline.from_pretrained(tiny["flux_path"])
    raw.load_lora_weights(tiny["lora_path"])  # UNO's file as is: diffusers detects the xlabs layout
    assert (pipeline_velocity(raw) - merged).abs().max() < 1e-5
    policy_dir = tiny["flux_path"] + "_lora"
    converted_dir = save_uno_lora_as_diffusers(tiny["lora_path"], policy_dir)
    assert converted_dir.is_file()
    ours = FluxPipeline.from_pretrained(tiny["flux_path"])
    ours.load_lora_weights(policy_dir)
    assert (pipeline_velocity(ours) - merged).abs().max() < 1e-5


def test_uno_sampling_defaults(tiny):
    # UNO's get_schedule: linspace(1, 0, T + 1) shifted with mu at (W/8)(H/8)/256 = 16 "tokens".
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (16 - 256)
    t = torch.linspace(1, 0, 26, dtype=torch.float64)
    expected = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    assert torch.allclose(uno_sigmas(25, 512, 512).double(), expected, atol=1e-6)
    assert uno_shift() == pytest.approx(1.583, abs=1e-3)
    default = build("uno", flux_path=tiny["flux_path"])  # no LoRA, UNO's defaults
    assert default.image_size == (512, 512) and default.guidance == 4.0 and default.num_steps == 25
    assert torch.equal(default.sigmas(), uno_sigmas(25, 512, 512))
    assert default.text_encoder.max_length == 16  # min(512, the tiny T5 tokenizer's length)
    assert default.guidance_tensor(3).tolist() == [4.0, 4.0, 4.0]


def test_reference_preprocessing():
    x = torch.rand(2, 3, 60, 40)
    out = resize_references(x, 32, 16)
    assert out.shape == (2, 3, 32, 16)  # long side 32, short 21 -> cropped to 16
    assert torch.equal(resize_references(torch.ones(1, 2, 3, 32, 32), 32, 16), torch.ones(1, 2, 3, 32, 32))


def test_policy_resizes_references_like_uno(policy):
    tokens, ids = policy.encode_references(torch.rand(2, 3, 48, 48))
    assert tokens.shape == (2, 64, 16)  # resized to the image's long side (32 px)
    tokens, ids = policy.encode_references(torch.rand(2, 2, 3, 32, 32))
    assert tokens.shape == (2, 2 * 25, 16)  # several: long side 32 * 0.625 = 20 px -> 5 x 5 tokens
    assert ids[:25, 1].min() == 8 and ids[25:, 1].min() == 13  # UnoPE continues after each reference


def test_prompt_cache_and_precomputed_embeddings(tiny, tmp_path):
    from cgrpo.policy.cache import precompute_prompt_embeddings

    policy = build("uno", **tiny, image_size=SIZE, prompt_cache=4)
    fresh, pooled, _ = policy.encode_prompts(PROMPTS)
    again, pooled_again, _ = policy.encode_prompts(list(reversed(PROMPTS)))
    assert torch.equal(again[1], fresh[0]) and torch.equal(pooled_again[0], pooled[1])
    assert policy.prompt_cache.misses == 2 and policy.prompt_cache.hits == 2
    path = precompute_prompt_embeddings(policy, PROMPTS + ["a dog"], tmp_path / "embeds.safetensors")
    loaded = build("uno", **tiny, image_size=SIZE, prompt_embeddings=str(path), prompt_cache=0)
    assert len(loaded.prompt_cache) == 3
    embeds, _, _ = loaded.encode_prompts(PROMPTS)
    assert torch.equal(embeds, fresh) and loaded.prompt_cache.misses == 0


def test_offload_keeps_text_encoders_off_the_move(tiny):
    policy = build("uno", **tiny, image_size=SIZE, offload=True)
    policy.to(torch.float64)
    assert policy.transformer.dtype == torch.float64
    assert next(policy.text_encoder.parameters()).dtype == torch.float32  # parked: not moved or cast
    assert "text_encoder" in dict(policy.named_children())
    embeds, _, _ = policy.encode_prompts(PROMPTS)
    assert embeds.shape == (2, 16, 32)
    plain = build("uno", **tiny, image_size=SIZE).to(torch.float64)
    assert next(plain.text_encoder.parameters()).dtype == torch.float64


def test_bf16_lora_training_step_with_checkpointing(tiny):
    policy = build("uno", **tiny, image_size=SIZE, dtype="bfloat16")
    assert policy.transformer.dtype == torch.bfloat16 and policy.codec.vae.dtype == torch.float32
    policy.add_lora(rank=4, alpha=4)
    policy.enable_gradient_checkpointing()
    policy.train()
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    references, latents, sigma = _inputs()
    cond = policy.condition(PROMPTS, references)
    v = policy.velocity(latents, sigma, cond)
    assert v.dtype == torch.float32 and v.shape == latents.shape
    v.square().mean().backward()
    grads = [p.grad for p in policy.trainable_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="transformer/"):
        build("uno", flux_path=str(tmp_path))
    with pytest.raises(TypeError, match="flux_path"):
        build("uno")
    with pytest.raises(TypeError, match="unknown uno policy option"):
        build("uno", flux_path=str(tmp_path), colour="red")


def test_save_and_load_pretrained(policy, tmp_path):
    references, latents, sigma = _inputs()
    policy.save_pretrained(tmp_path / "saved")  # the transformer with UNO's LoRA merged, policy.json
    loaded = UnoPolicy.from_pretrained(tmp_path / "saved")
    assert isinstance(loaded, UnoPolicy) and loaded.guidance == 4.0 and loaded.image_size == (SIZE, SIZE)
    with torch.no_grad():
        a = policy.velocity(latents, sigma, policy.condition(PROMPTS, references))
        b = loaded.velocity(latents, sigma, loaded.condition(PROMPTS, references))
    assert torch.equal(a, b)
