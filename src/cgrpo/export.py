"""Export a trained adapter for use outside cgrpo: :func:`export_adapter` (diffusers LoRA file),
:func:`export_merged` (the transformer with the LoRA merged in) and the ``cgrpo export`` command.

A run folder (``runs/x``) holds ``config.yaml`` (which policy, with which options and LoRA settings),
``final/`` (the adapter in peft's format: ``adapter_config.json`` + ``adapter_model.safetensors``) and
``checkpoints/step-N/trainable.safetensors``. ``cgrpo export`` accepts a run folder, an adapter folder or a
checkpoint folder.

The diffusers file is written by the matching pipeline class's own ``save_lora_weights`` (``FluxPipeline``
for ``uno``, ``FluxKontextPipeline``, ``Flux2KleinPipeline``), with the peft config (rank, alpha, targets) as
the file's adapter metadata, so that ``pipe.load_lora_weights(OUT)`` reproduces the policy's transformer
exactly (tested). For ``uno`` the base transformer is FLUX.1-dev *with UNO's LoRA merged*: load UNO's LoRA
first (``pipe.load_lora_weights(uno_dir, adapter_name="uno")`` after
:func:`cgrpo.policy.uno_lora.save_uno_lora_as_diffusers`, or use ``--merge``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from cgrpo.policy.adapter import resolve_adapter
from cgrpo.policy.base import Policy


def _latest_checkpoint(path: Path) -> Path | None:
    from cgrpo.train.checkpoint import latest_checkpoint

    if (path / "trainable.safetensors").is_file():
        return path
    return latest_checkpoint(path / "checkpoints")


def _find_run_config(path: Path) -> Path | None:
    for candidate in (path, path.parent, path.parent.parent, path.parent.parent.parent):
        if (candidate / "config.yaml").is_file():
            return candidate / "config.yaml"
    return None


def load_trained_policy(
    source: str | Path,
    policy: str | None = None,
    options: dict[str, Any] | None = None,
    device: str | None = None,
):
    """The policy of a run / adapter / checkpoint folder with its trained LoRA loaded.

    ``policy`` and ``options`` default to the run's ``config.yaml`` (found in ``source`` or above it);
    ``options`` given here override the run's one by one (e.g. a new ``flux_path`` on another machine).
    """
    from cgrpo import policy as policies
    from cgrpo.config import load_config
    from cgrpo.train.config import GRPOConfig

    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist: expected a run, adapter or checkpoint folder")
    config_path = _find_run_config(source)
    config = load_config(GRPOConfig, config_path) if config_path is not None else None
    name = policy or (config.policy.name if config is not None else None)
    if name is None:
        raise ValueError(f"{source} has no config.yaml: pass --policy NAME (and --policy-option KEY=VALUE)")
    merged_options = dict(config.policy.options) if config is not None and name == config.policy.name else {}
    merged_options.update(options or {})
    built = policies.build(name, **merged_options)
    try:
        built.load_lora(resolve_adapter(source))
    except FileNotFoundError:
        checkpoint = _latest_checkpoint(source)
        if checkpoint is None or config is None:
            raise
        from safetensors.torch import load_file

        lora = config.policy.lora
        built.add_lora(lora.rank, lora.alpha, lora.dropout, lora.target_modules)
        weights = load_file(str(checkpoint / "trainable.safetensors"))
        params = dict(built.transformer.named_parameters())
        unknown = sorted(set(weights) - set(params))
        if unknown:
            raise ValueError(f"checkpoint {checkpoint} has weights the policy lacks: {unknown[:3]}") from None
        with torch.no_grad():
            for key, value in weights.items():
                params[key].copy_(value)
    if device is not None:
        built.to(device)
    return built.eval()


def export_adapter(policy: Policy, directory: str | Path) -> Path:
    """Write the policy's LoRA as ``directory/pytorch_lora_weights.safetensors`` in the format of its
    diffusers pipeline (:attr:`Policy.pipeline_class`)."""
    if not policy.has_lora:
        raise ValueError("the policy has no LoRA adapter to export")
    state = {key: value.detach().cpu().contiguous() for key, value in policy.lora_state_dict().items()}
    metadata = policy.transformer.peft_config["default"].to_dict()
    metadata = {k: sorted(v) if isinstance(v, set) else v for k, v in metadata.items()}
    policy.pipeline_class.save_lora_weights(
        directory, transformer_lora_layers=state, transformer_lora_adapter_metadata=metadata
    )
    return Path(directory) / "pytorch_lora_weights.safetensors"


def export_merged(policy: Policy, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Merge the LoRA into the transformer's weights and ``save_pretrained`` it to ``directory/transformer``
    (a plain diffusers transformer folder that replaces ``transformer/`` of the base checkpoint). The policy's
    transformer is modified in place (the adapter is removed)."""
    from cgrpo.policy.flux import atomic_directory

    transformer = policy.transformer
    if policy.has_lora:
        transformer.fuse_lora(lora_scale=1.0)
        transformer.unload_lora()
    if dtype is not None:
        transformer.to(dtype)
    with atomic_directory(Path(directory) / "transformer") as tmp:
        transformer.save_pretrained(tmp)
    return Path(directory) / "transformer"


def export_command(
    source: Annotated[Path, typer.Argument(help="Run folder, adapter folder (final/) or checkpoint folder.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    policy: Annotated[
        str | None, typer.Option("--policy", help="Policy name (default: the run's config.yaml).")
    ] = None,
    policy_option: Annotated[
        list[str] | None,
        typer.Option("--policy-option", help="KEY=VALUE overriding the run's policy options (repeat)."),
    ] = None,
    merge: Annotated[
        bool, typer.Option("--merge", help="Save the merged transformer instead of a LoRA file.")
    ] = False,
    device: Annotated[str | None, typer.Option("--device", help="Where to merge (cuda is faster).")] = None,
) -> None:
    """Export a trained LoRA as a diffusers LoRA file, or (``--merge``) as a merged transformer."""
    from cgrpo.config import parse_policy_options

    try:
        trained = load_trained_policy(source, policy, parse_policy_options(policy_option), device=device)
        path = export_merged(trained, out) if merge else export_adapter(trained, out)
    except (ValueError, FileNotFoundError, TypeError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=2) from None
    typer.echo(f"wrote {path}")
