"""Generate images from (reference, prompt) pairs with any registered policy: :func:`sample` and the
``cgrpo sample`` command (:func:`sample_command`).

Sampling is the deterministic Euler ODE of the backbone's own schedule (``policy.sigmas``: UNO's shift for
``uno``, the pipeline's for Kontext / FLUX.2 [klein]) with the backbone's default step count and guidance
unless overridden. Image ``i`` of a call starts from the noise of ``seed + i`` (so an image does not depend on
what else is in the batch). References are preprocessed as the backbone's pipeline does
(:meth:`Policy.prepare_references`: UNO keeps the aspect ratio at long side 512, or 320 with several;
Kontext and FLUX.2 [klein] as their diffusers pipelines; the mini policy a square of its image size), each
reference at its own size.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from PIL import Image

from cgrpo.policy.base import Policy

ReferenceLike = Image.Image | str | Path | torch.Tensor
References = ReferenceLike | Sequence[ReferenceLike]


def _open(reference: ReferenceLike) -> Image.Image | torch.Tensor:
    """A path is decoded (EXIF rotation honoured); PIL images and ``[3, H, W]`` tensors stay as they are."""
    from cgrpo.data.formats import open_rgb

    if isinstance(reference, str | Path):
        if not Path(reference).is_file():
            raise FileNotFoundError(f"reference image {reference} does not exist")
        return open_rgb(reference)
    if isinstance(reference, torch.Tensor):
        return reference.float()
    return reference.convert("RGB")


def _prepared(policy: Policy, references: References) -> list[torch.Tensor]:
    """One pair's K reference(s) -> K tensors ``[3, H_k, W_k]`` as the policy prepares them."""
    if isinstance(references, Image.Image | str | Path) or (
        isinstance(references, torch.Tensor) and references.ndim == 3
    ):
        references = [references]
    return policy.prepare_references([_open(r) for r in references])


@torch.no_grad()
def sample(
    policy: Policy,
    references: Sequence[References | None],
    prompts: Sequence[str],
    num_steps: int | None = None,
    seed: int = 0,
    guidance: float | None = None,
    batch_size: int = 4,
    seeds: Sequence[int] | None = None,
) -> list[Image.Image]:
    """One image per (reference(s), prompt) pair.

    ``references[i]``: a PIL image, an image path, a ``[3, H, W]`` tensor in [0, 1], a list of those (several
    references of one subject) or None (text only). ``num_steps``/``guidance`` default to the policy's
    (UNO: 25 steps, guidance 4). Image i starts from the noise of ``seeds[i]`` (default ``seed + i``).
    Returns PIL images of the policy's ``image_size``.
    """
    from cgrpo.imaging import to_uint8
    from cgrpo.train.sampling import schedule, seeded_images

    if len(references) != len(prompts):
        raise ValueError(f"{len(references)} references for {len(prompts)} prompts: expected one per prompt")
    seeds = [seed + i for i in range(len(prompts))] if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    sigmas = schedule(policy, num_steps)
    stacks = [None if r is None else _prepared(policy, r) for r in references]
    was_training = policy.training
    policy.eval()
    images: list[Image.Image] = []
    try:
        # The policy's own guidance unless one is given (:meth:`Policy.override_guidance`).
        with contextlib.nullcontext() if guidance is None else policy.override_guidance(guidance):
            for chunk in _chunks(stacks, batch_size):
                first = stacks[chunk[0]]
                refs = (
                    None
                    if first is None
                    else [torch.stack([stacks[i][k] for i in chunk]) for k in range(len(first))]
                )
                cond = policy.condition([prompts[i] for i in chunk], refs)
                # Noise is drawn on the CPU (the same numbers on any machine), then integrated on the device.
                decoded = seeded_images(policy, cond, [seeds[i] for i in chunk], sigmas)
                images += [Image.fromarray(a) for a in to_uint8(decoded)]
    finally:
        policy.train(was_training)
    return images


def _chunks(stacks: Sequence[list[torch.Tensor] | None], batch_size: int) -> Iterator[list[int]]:
    """Index chunks of at most ``batch_size`` consecutive pairs whose references batch together (the same
    count and sizes, or all None)."""
    chunk: list[int] = []
    chunk_key: tuple | None = None
    for i, stack in enumerate(stacks):
        key = None if stack is None else tuple(tuple(r.shape) for r in stack)
        if chunk and (len(chunk) >= batch_size or key != chunk_key):
            yield chunk
            chunk = []
        if not chunk:
            chunk_key = key
        chunk.append(i)
    if chunk:
        yield chunk


# --- command line -----------------------------------------------------------------------------------------


def build_policy(
    name: str, options: dict[str, Any], lora: str | Path | None = None, device: str | None = None
) -> Policy:
    """A registered policy, optionally with a trained adapter (an adapter folder or a run folder) loaded."""
    from cgrpo import policy as policies
    from cgrpo.policy.adapter import resolve_adapter

    built = policies.build(name, **options)
    if lora is not None:
        built.load_lora(resolve_adapter(lora))
    if device is not None:
        built.to(device)
    return built.eval()


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def sample_command(
    out: Annotated[Path, typer.Option("--out", help="Folder for the images and samples.jsonl.")],
    policy: Annotated[
        str, typer.Option("--policy", help="Registered policy: uno, flux-kontext, flux2-klein, mini.")
    ] = "uno",
    policy_option: Annotated[
        list[str] | None,
        typer.Option(
            "--policy-option",
            help="KEY=VALUE passed to the policy, e.g. flux_path=/ckpt/FLUX.1-dev (repeat).",
        ),
    ] = None,
    reference: Annotated[
        list[Path] | None,
        typer.Option(
            "--reference", help="Reference image; one for all prompts or one per --prompt (repeat)."
        ),
    ] = None,
    prompt: Annotated[list[str] | None, typer.Option("--prompt", help="Prompt (repeat for several).")] = None,
    pairs: Annotated[
        Path | None,
        typer.Option("--pairs", help="JSONL dataset of (reference, prompt) records (docs/datasets.md)."),
    ] = None,
    lora: Annotated[
        Path | None, typer.Option("--lora", help="Trained adapter folder, or a run folder.")
    ] = None,
    num_steps: Annotated[
        int | None, typer.Option("--num-steps", help="Sampling steps (default: the policy's).")
    ] = None,
    guidance: Annotated[
        float | None, typer.Option("--guidance", help="Guidance scale (default: the policy's).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Image i of a pair uses seed + its index.")] = 0,
    images_per_prompt: Annotated[int, typer.Option("--images-per-prompt", help="Images per pair.")] = 1,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Pairs per forward batch.")] = 1,
    device: Annotated[
        str | None, typer.Option("--device", help="cuda or cpu (default: cuda when available).")
    ] = None,
) -> None:
    """Generate images for (reference, prompt) pairs: ``--reference IMG --prompt "..."`` or ``--pairs``."""
    from cgrpo.config import parse_policy_options
    from cgrpo.imaging import save_png
    from cgrpo.io import atomic_write_text

    try:
        rows = _pairs_from_arguments(reference, prompt, pairs)
        options = parse_policy_options(policy_option)
        model = build_policy(policy, options, lora=lora, device=device or _default_device())
    except (ValueError, FileNotFoundError, TypeError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=2) from None
    out.mkdir(parents=True, exist_ok=True)
    # Image j of every pair starts from the noise of seed + j (UNO's inference convention).
    jobs = [(i, j, row) for i, row in enumerate(rows) for j in range(images_per_prompt)]
    manifest = []
    group = max(batch_size, 1) * 4  # write images as they come, a few batches at a time
    for start in range(0, len(jobs), group):
        part = jobs[start : start + group]
        images = sample(
            model,
            [row["references"] or None for _, _, row in part],
            [row["prompt"] for _, _, row in part],
            num_steps=num_steps,
            guidance=guidance,
            batch_size=batch_size,
            seeds=[seed + j for _, j, _ in part],
        )
        for (i, j, row), image in zip(part, images, strict=True):
            name = f"{i:04d}_{j}.png"
            save_png(image, out / name)
            manifest.append(
                {
                    "file": name,
                    "id": row["id"],
                    "prompt": row["prompt"],
                    "reference": [str(path) for path in row["references"]],
                    "seed": seed + j,
                }
            )
            typer.echo(f"{out / name}  {row['prompt']}")
    atomic_write_text(out / "samples.jsonl", "".join(json.dumps(m) + "\n" for m in manifest))


def _pairs_from_arguments(
    reference: Sequence[Path] | None, prompt: Sequence[str] | None, pairs: Path | None
) -> list[dict[str, Any]]:
    if pairs is not None:
        if reference or prompt:
            raise ValueError("give either --pairs or --reference/--prompt, not both")
        from cgrpo.data.formats import load_dataset

        dataset = load_dataset(pairs)
        return [{"id": r.id, "prompt": r.prompt, "references": list(r.references)} for r in dataset.records]
    prompts = list(prompt or [])
    refs = list(reference or [])
    if not prompts:
        raise ValueError("give at least one --prompt (or --pairs FILE.jsonl)")
    if len(refs) not in (0, 1, len(prompts)):
        raise ValueError(f"{len(refs)} --reference for {len(prompts)} --prompt: give one, or one per prompt")
    for path in refs:
        if not path.is_file():
            raise FileNotFoundError(f"reference image {path} does not exist")
    per_prompt = refs * len(prompts) if len(refs) == 1 else refs
    return [
        {"id": str(i), "prompt": p, "references": [per_prompt[i]] if per_prompt else []}
        for i, p in enumerate(prompts)
    ]
