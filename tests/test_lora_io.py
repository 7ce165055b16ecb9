"""Adapters trained through peft load into the matching diffusers pipeline with ``load_lora_weights``, and
merged exports reproduce the adapted transformer."""

from __future__ import annotations

import pytest
import torch
import typer
from typer.testing import CliRunner

from cgrpo.export import export_adapter, export_command, export_merged, load_trained_policy
from cgrpo.policy import build
from cgrpo.policy.adapter import resolve_adapter

PROMPTS = ["a photo of a dog", "a red cube on the beach"]
# Stacking UNO's adapter and ours on one pipeline is intended; peft warns about any second adapter.
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")


def _randomise_lora(policy, seed: int = 0) -> None:
    """Give the adapter non-zero B matrices (a freshly initialised LoRA is the identity)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in policy.transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def _transformer_call(policy, transformer, latents, sigma, cond):
    """The pipeline's own transformer call on our conditioning (the FLUX.1 or the FLUX.2 signature)."""
    kwargs = dict(
        hidden_states=torch.cat([latents, cond.reference_tokens], dim=1),
        encoder_hidden_states=cond.prompt_embeds,
        timestep=sigma,
        img_ids=torch.cat([policy.image_ids(), cond.reference_ids]),
        txt_ids=cond.text_ids,
        guidance=cond.guidance,
        return_dict=False,
    )
    if cond.pooled_prompt_embeds.shape[-1]:
        kwargs["pooled_projections"] = cond.pooled_prompt_embeds
    with torch.no_grad():
        return transformer(**kwargs)[0][:, : latents.shape[1]]


def _setup(kind: str, root):
    if kind == "uno":
        from cgrpo.testing.policies import save_tiny_uno

        options, size = save_tiny_uno(root / "uno"), 32
        base = options["flux_path"]
    elif kind == "flux-kontext":
        from cgrpo.testing.policies import save_tiny_kontext

        options, size = save_tiny_kontext(root / "kontext"), 32
        base = options["flux_path"]
        # references at the test's size: Kontext's own default (~1 MP) would make this CPU test take minutes
        options["reference_size"] = size
    else:
        from cgrpo.testing.policies import save_tiny_flux2_klein

        options, size = save_tiny_flux2_klein(root / "klein"), 32
        base = options["path"]
        options["cfg_scale"] = (
            1.0  # compare single conditional forwards (CFG is the policy's, not the model's)
        )
    return options, size, base


@pytest.mark.parametrize("kind", ["uno", "flux-kontext", "flux2-klein"])
def test_exported_adapter_loads_into_the_pipeline(kind, tmp_path):
    options, size, base = _setup(kind, tmp_path)
    policy = build(kind, **options, image_size=size)
    policy.add_lora(rank=4, alpha=8)  # scaling alpha / r = 2: the metadata must carry it
    _randomise_lora(policy)
    g = torch.Generator().manual_seed(0)
    references = torch.rand(2, 3, size, size, generator=g)
    latents = policy.initial_noise(2, g)
    sigma = torch.tensor([0.8, 0.3])
    with torch.no_grad():
        cond = policy.condition(PROMPTS, references)
        ours = policy.velocity(latents, sigma, cond)
        base_velocity = _transformer_call(
            policy, build(kind, **options, image_size=size).transformer, latents, sigma, cond
        )
    assert (ours - base_velocity).abs().max() > 1e-3

    path = export_adapter(policy, tmp_path / "export")
    assert path.name == "pytorch_lora_weights.safetensors" and path.is_file()
    pipe = policy.pipeline_class.from_pretrained(base)
    if kind == "uno":
        # The uno policy's base is FLUX + UNO's LoRA: stack UNO's file (diffusers reads its layout) and ours.
        pipe.load_lora_weights(options["lora_path"], adapter_name="uno")
        pipe.load_lora_weights(tmp_path / "export", adapter_name="grpo")
        pipe.set_adapters(["uno", "grpo"], [1.0, 1.0])
    else:
        pipe.load_lora_weights(tmp_path / "export")
    got = _transformer_call(policy, pipe.transformer, latents, sigma, cond)
    diff = (got - ours).abs().max().item()
    assert diff < 1e-5, diff

    merged_dir = export_merged(policy, tmp_path / "merged")
    merged = type(policy.transformer).from_pretrained(merged_dir)
    diff = (_transformer_call(policy, merged, latents, sigma, cond) - ours).abs().max().item()
    assert diff < 1e-5, diff
    assert not policy.has_lora


def test_export_command_on_a_run_folder(tmp_path):
    from cgrpo.config import save_config
    from cgrpo.testing.policies import save_tiny_uno
    from cgrpo.train.config import GRPOConfig, LoraConfig, PolicyConfig

    options = save_tiny_uno(tmp_path / "uno")
    policy = build("uno", **options, image_size=32)
    policy.add_lora(rank=2, alpha=2)
    _randomise_lora(policy, seed=3)
    run = tmp_path / "run"
    policy.save_lora(run / "final")
    config = GRPOConfig(
        policy=PolicyConfig(
            name="uno", options={**options, "image_size": 32}, lora=LoraConfig(rank=2, alpha=2)
        )
    )
    save_config(config, run / "config.yaml")
    assert resolve_adapter(run) == run / "final"

    app = typer.Typer()
    app.command("export")(export_command)
    app.command("other")(lambda: None)  # two commands: the sub-command name is required, as in cgrpo
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    result = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "merged"), "--merge"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "merged" / "transformer" / "config.json").is_file()
    result = runner.invoke(app, ["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "does not exist" in result.output

    # A checkpoint folder (trainable.safetensors) is read with the run's LoRA settings.
    from cgrpo.train.checkpoint import save_checkpoint

    save_checkpoint(run / "checkpoints", 5, policy.transformer, {})
    loaded = load_trained_policy(run / "checkpoints" / "step-000005")
    a = dict(loaded.transformer.named_parameters())
    for name, param in policy.transformer.named_parameters():
        if param.requires_grad:
            assert torch.equal(a[name], param)
