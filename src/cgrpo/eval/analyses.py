"""The paper's analyses, each written as a PNG plus the numbers behind it in JSON.

- :func:`conflict_analysis` — reward conflict (Fig. 7 and App. B.2): share of samples whose identity and
  prompt advantages have strictly opposite signs, over training; the Fig. 7(a) quadrant distribution and the
  per-denoising-step rate when the run logged per-sample advantages
  (:func:`~cgrpo.train.advantage_log.log_advantages`).
- :func:`frequency_analysis` — Fig. 4: low- and high-frequency energy of the predicted clean image
  ``x0_hat = x_t - sigma_t * v`` along an ODE trajectory.
- :func:`tradeoff_analysis` — identity metric vs prompt metric of several runs / evaluations with the Pareto
  front (Fig. 1, Fig. 6(b)).

The reward-human correlation (Tables 6/7) is in :mod:`cgrpo.eval.correlation`.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from cgrpo.eval.stats import pareto_front  # noqa: E402
from cgrpo.io import atomic_write, atomic_write_json  # noqa: E402
from cgrpo.train.advantage_log import ADVANTAGES_FILE  # noqa: E402

PAPER_CONFLICT_RATE = 0.502  # App. B.2: 300 groups of 12 images on UNO
QUADRANTS = ("synergy", "prompt_failure", "id_failure", "both_poor", "neutral")
QUADRANT_LABELS = {
    "synergy": "A_id>0, A_prompt>0 (perfect)",
    "prompt_failure": "A_id>0, A_prompt<0 (prompt failure)",
    "id_failure": "A_id<0, A_prompt>0 (ID failure)",
    "both_poor": "A_id<0, A_prompt<0 (both poor)",
    "neutral": "an advantage is exactly 0",
}


def save_figure(fig, path: str | Path) -> Path:
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)
    return out


def _moving_average(values: Sequence[float], window: int) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if window <= 1 or len(values) < window:
        return values
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    head = cumulative[1:window] / np.arange(1, window)  # growing window at the start, no lag artefact
    return np.concatenate([head, (cumulative[window:] - cumulative[:-window]) / window])


# --- reward conflict ------------------------------------------------------------------------------------


@torch.no_grad()
def stepwise_advantages(
    policy,
    trajectory,
    cond,
    identity_reward,
    prompt_reward,
    references: torch.Tensor,
    prompts: Sequence[str],
    subjects: Sequence[str] | None,
    group_size: int,
    steps: Sequence[int] | None = None,
) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Per-denoising-step advantages of a rollout, for the per-step conflict analysis.

    At each step t (all, or ``steps``) the predicted clean image ``x0_hat_t = x_t - sigma_t * v(x_t)`` of
    every sample (``trajectory.latents [N, T + 1, L, C]``, ``cond`` of N samples) is decoded and scored with
    both rewards; each reward is normalised in its group (:func:`cgrpo.advantage.group_normalize`).
    ``references [N, 3, H, W]``, ``prompts`` and ``subjects`` are per sample. Costs one forward pass and two
    reward calls per step: call it every few iterations, then ``log_advantages(..., denoising_step=t)``.
    Returns ``[(t, a_id [N], a_prompt [N]), ...]``.
    """
    from cgrpo.advantage import group_normalize

    device = policy.device
    num_steps = trajectory.latents.shape[1] - 1
    out = []
    for t in steps if steps is not None else range(num_steps):
        x_t = trajectory.latents[:, t].to(device)
        sigma = float(trajectory.sigmas[t])
        velocity = policy.velocity(x_t, torch.full((x_t.shape[0],), sigma, device=device), cond).float()
        images = policy.decode(x_t.float() - sigma * velocity).float()
        advantages = []
        for reward in (identity_reward, prompt_reward):
            scores = torch.as_tensor(reward(images, references, list(prompts), subjects)).float().cpu()
            valid = torch.isfinite(scores)
            advantages.append(group_normalize(scores, group_size, valid=valid))
        out.append((int(t), advantages[0], advantages[1]))
    return out


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def quadrants(a_id: np.ndarray, a_prompt: np.ndarray) -> dict[str, int]:
    """Counts of the Fig. 7(a) quadrants for paired advantages ``[N]`` (non-finite pairs are skipped).

    Conflict = ``prompt_failure + id_failure`` (strictly opposite signs), as in
    :func:`cgrpo.advantage.conflict_mask`; a pair with an exact zero is ``neutral``.
    """
    a_id, a_prompt = np.asarray(a_id, dtype=float), np.asarray(a_prompt, dtype=float)
    keep = np.isfinite(a_id) & np.isfinite(a_prompt)
    a, b = a_id[keep], a_prompt[keep]
    return {
        "synergy": int(((a > 0) & (b > 0)).sum()),
        "prompt_failure": int(((a > 0) & (b < 0)).sum()),
        "id_failure": int(((a < 0) & (b > 0)).sum()),
        "both_poor": int(((a < 0) & (b < 0)).sum()),
        "neutral": int(((a == 0) | (b == 0)).sum()),
    }


def conflict_share(counts: dict[str, int]) -> float:
    total = sum(counts.values())
    return (counts["prompt_failure"] + counts["id_failure"]) / total if total else float("nan")


def _advantage_arrays(records: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    a = np.array([np.nan if v is None else v for r in records for v in r["a_id"]], dtype=float)
    b = np.array([np.nan if v is None else v for r in records for v in r["a_prompt"]], dtype=float)
    return a, b


def conflict_analysis(run_dir: str | Path, out: str | Path | None = None, smooth: int = 0) -> dict[str, Any]:
    """Reward conflict of a run -> ``conflict.json`` and ``conflict.png`` in ``out`` (default: the run).

    - over training: ``conflict_rate`` of every logged iteration of ``metrics.jsonl`` (the trainer computes
      it on the iteration's valid samples), with its moving average (window ``smooth``, default ~N/15);
    - from ``advantages.jsonl`` if present: the quadrant distribution of all logged samples (Fig. 7(a)) and,
      for records with a denoising step ``t``, the conflict rate per step.
    """
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir
    metrics_path, advantages_path = run_dir / "metrics.jsonl", run_dir / ADVANTAGES_FILE
    if not metrics_path.is_file() and not advantages_path.is_file():
        raise FileNotFoundError(
            f"{run_dir}: neither metrics.jsonl nor {ADVANTAGES_FILE}; is it a training run?"
        )
    result: dict[str, Any] = {"run": str(run_dir), "paper_conflict_rate": PAPER_CONFLICT_RATE}

    records = read_jsonl(metrics_path) if metrics_path.is_file() else []
    logged = [
        (r["step"], r["conflict_rate"]) for r in records if isinstance(r.get("conflict_rate"), int | float)
    ]
    if logged:
        steps, rates = (list(x) for x in zip(*logged, strict=True))
        window = smooth or max(1, len(rates) // 15)
        tenth = max(1, len(rates) // 10)
        result["training"] = {
            "steps": steps,
            "conflict_rate": rates,
            "smoothed": [round(float(v), 6) for v in _moving_average(rates, window)],
            "window": window,
            "mean": float(np.mean(rates)),
            "first_10pct_mean": float(np.mean(rates[:tenth])),
            "last_10pct_mean": float(np.mean(rates[-tenth:])),
        }

    advantages = read_jsonl(advantages_path) if advantages_path.is_file() else []
    per_sample = [r for r in advantages if "t" not in r] or [r for r in advantages]
    if per_sample:
        counts = quadrants(*_advantage_arrays(per_sample))
        total = sum(counts.values())
        result["quadrants"] = {
            "counts": counts,
            "shares": {k: (v / total if total else float("nan")) for k, v in counts.items()},
            "conflict_rate": conflict_share(counts),
            "n_samples": total,
            "n_iterations": len({r["step"] for r in per_sample}),
            "labels": QUADRANT_LABELS,
        }
    by_t: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for record in advantages:
        if "t" in record:
            by_t[int(record["t"])].append(record)
    if by_t:
        ts = sorted(by_t)
        per_t = [quadrants(*_advantage_arrays(by_t[t])) for t in ts]
        result["per_denoising_step"] = {
            "t": ts,
            "conflict_rate": [conflict_share(c) for c in per_t],
            "n_samples": [sum(c.values()) for c in per_t],
        }
    if "training" not in result and "quadrants" not in result:
        raise ValueError(f"{run_dir}: no conflict_rate in metrics.jsonl and no advantages logged")

    _plot_conflict(result, out / "conflict.png")
    atomic_write_json(out / "conflict.json", result)
    return result


def _plot_conflict(result: dict[str, Any], path: Path) -> Path:
    panels = [k for k in ("quadrants", "training", "per_denoising_step") if k in result]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "quadrants":
            q = result["quadrants"]
            names = [k for k in QUADRANTS if k != "neutral" or q["counts"]["neutral"]]
            shares = [q["shares"][k] for k in names]
            colors = ["C2", "C1", "C3", "0.5", "0.8"][: len(names)]
            ax.bar(range(len(names)), shares, color=colors)
            ax.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=8)
            ax.set_ylabel("share of samples")
            ax.set_title(f"(a) advantage alignment: conflict {q['conflict_rate']:.1%} (n={q['n_samples']})")
        elif panel == "training":
            tr = result["training"]
            ax.plot(tr["steps"], tr["conflict_rate"], color="0.75", lw=0.8, label="per iteration")
            if tr["window"] > 1:
                ax.plot(tr["steps"], tr["smoothed"], color="C1", lw=1.6, label=f"mean of {tr['window']}")
            ax.axhline(PAPER_CONFLICT_RATE, ls="--", color="k", lw=1, label="paper (UNO): 50.2%")
            ax.set_ylim(0, 1)
            ax.set_xlabel("iteration")
            ax.set_ylabel("conflict rate")
            ax.set_title("(b) conflict over training")
            ax.legend(fontsize=8)
        else:
            st = result["per_denoising_step"]
            ax.plot(st["t"], st["conflict_rate"], "o-", color="C4")
            ax.set_ylim(0, 1)
            ax.set_xlabel("denoising step (0 = noisiest)")
            ax.set_ylabel("conflict rate")
            ax.set_title("(c) conflict per denoising step")
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


# --- frequency analysis of denoising --------------------------------------------------------------------

DEFAULT_CUTOFF = 0.125  # cycles per pixel: a quarter of the Nyquist frequency (0.5)


def luminance(images: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` RGB in [0, 1] -> ``[N, H, W]`` Rec. 601 luma."""
    weights = images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images.float() * weights).sum(dim=1)


def radial_frequency(height: int, width: int) -> torch.Tensor:
    """``[H, W]`` radial frequency of each FFT bin in cycles per pixel (0 at DC, ~0.707 at the corner)."""
    fy = torch.fft.fftfreq(height).view(-1, 1)
    fx = torch.fft.fftfreq(width).view(1, -1)
    return torch.sqrt(fy**2 + fx**2)


def spectrum(images: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` -> ``[N, H, W]`` complex 2-D FFT of the mean-removed luma, ``norm="ortho"`` so that
    ``sum |F|^2 = sum (y - mean y)^2`` (Parseval): band energies are in pixel units and add up."""
    y = luminance(images)
    y = y - y.mean(dim=(-2, -1), keepdim=True)  # DC (mean brightness) is neither structure nor detail
    return torch.fft.fft2(y, norm="ortho")


def band_masks(height: int, width: int, cutoff: float = DEFAULT_CUTOFF) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) bool masks ``[H, W]``: ``0 < r <= cutoff`` and ``r > cutoff`` (r in cycles per pixel)."""
    if not 0 < cutoff < 0.5:
        raise ValueError(f"frequency cutoff must be in (0, 0.5) cycles per pixel, got {cutoff}")
    r = radial_frequency(height, width)
    return (r > 0) & (r <= cutoff), r > cutoff


def band_energies(images: torch.Tensor, cutoff: float = DEFAULT_CUTOFF) -> tuple[torch.Tensor, torch.Tensor]:
    """Low- and high-frequency energy ``[N]`` each of images ``[N, 3, H, W]`` (see :func:`spectrum`)."""
    power = spectrum(images).abs() ** 2
    low, high = band_masks(*images.shape[-2:], cutoff)
    return (power * low).sum(dim=(-2, -1)), (power * high).sum(dim=(-2, -1))


@torch.no_grad()
def denoising_predictions(
    policy, cond, noise: torch.Tensor, sigmas: torch.Tensor, keep: int = 0
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Euler ODE from ``noise [B, N, C]``; at each step t the predicted clean image
    ``x0_hat_t = x_t - sigma_t * v(x_t, sigma_t)``, decoded to pixels.

    Returns (spectra, images): ``T`` spectra ``[B, H, W]`` (complex, CPU) and, for the first ``keep``
    samples, ``T`` decoded predictions ``[keep, 3, H, W]``. The last prediction equals the final sample (the
    last Euler step goes to sigma 0 along the same velocity).
    """
    from cgrpo.train.sampling import ode_sample

    spectra, kept = [], []

    def record(t: int, x: torch.Tensor, velocity: torch.Tensor) -> None:
        x0_hat = policy.decode(x.float() - float(sigmas[t]) * velocity.float()).float().cpu()
        spectra.append(spectrum(x0_hat))
        if keep:
            kept.append(x0_hat[:keep])

    ode_sample(policy, cond, sigmas, noise, on_step=record)
    return spectra, kept


def frequency_curves(
    spectra: Sequence[torch.Tensor], cutoff: float = DEFAULT_CUTOFF
) -> dict[str, list[float]]:
    """Per-step statistics of ``T`` spectra ``[B, H, W]`` (step T-1 is the final image), averaged over B:

    - ``low_energy`` / ``high_energy``: mean band energy of ``x0_hat_t``;
    - ``low_normalised`` / ``high_normalised``: those divided by the final image's (mean) band energy;
    - ``low_converged`` / ``high_converged``: ``1 - |F_t - F_final|^2 / |F_final|^2`` summed over the band,
      the share of the final image's band content already in place at step t (1 = formed, can go below 0).
    """
    h, w = spectra[0].shape[-2:]
    low, high = band_masks(h, w, cutoff)
    final = spectra[-1]
    curves: dict[str, list[float]] = defaultdict(list)
    for name, mask in (("low", low), ("high", high)):
        final_energy = float(((final.abs() ** 2) * mask).sum(dim=(-2, -1)).mean())
        for s in spectra:
            energy = float(((s.abs() ** 2) * mask).sum(dim=(-2, -1)).mean())
            error = float(((s - final).abs() ** 2 * mask).sum(dim=(-2, -1)).mean())
            curves[f"{name}_energy"].append(energy)
            curves[f"{name}_normalised"].append(energy / final_energy if final_energy > 0 else float("nan"))
            curves[f"{name}_converged"].append(
                1.0 - error / final_energy if final_energy > 0 else float("nan")
            )
    return dict(curves)


def frequency_analysis(
    policy,
    prompts: Sequence[str],
    references: torch.Tensor | Sequence[torch.Tensor],
    seeds: Sequence[int],
    sigmas: torch.Tensor,
    out: str | Path,
    cutoff: float = DEFAULT_CUTOFF,
    batch_size: int = 8,
    show: int = 4,
) -> dict[str, Any]:
    """Fig. 4 over (prompt, reference ``[3, h, w]``, seed) triples -> ``frequency.json``, ``frequency.png``
    (normalised curves per step) and ``frequency_progression.png`` (x0_hat per step for ``show`` samples).
    References of different sizes (UNO keeps their aspect ratio) go to different forward batches."""
    from cgrpo.train.sampling import seeded_noise

    out = Path(out)
    device = policy.device
    all_spectra: list[list[torch.Tensor]] = []
    shown: list[list[torch.Tensor]] = []
    for start, stop in _same_size_batches(references, batch_size):
        cond = policy.condition(
            list(prompts[start:stop]), torch.stack(list(references[start:stop])).to(device)
        )
        keep = max(0, min(show - start, stop - start))
        noise = seeded_noise(policy, seeds[start:stop])
        spectra, kept = denoising_predictions(policy, cond, noise, sigmas, keep=keep)
        all_spectra.append(spectra)
        if keep:
            shown.append(kept)
    num_steps = len(sigmas) - 1
    spectra = [torch.cat([batch[t] for batch in all_spectra]) for t in range(num_steps)]
    result: dict[str, Any] = {
        "num_pairs": len(prompts),
        "num_steps": num_steps,
        "sigmas": [float(s) for s in sigmas[:-1]],
        "cutoff_cycles_per_pixel": cutoff,
        "image_size": list(spectra[0].shape[-2:]),
        "definition": (
            "FFT of the mean-removed Rec.601 luma of x0_hat = x_t - sigma_t * v (decoded), norm='ortho'; "
            "low band 0 < r <= cutoff, high band r > cutoff, r = radial frequency in cycles/pixel; "
            "normalised = band energy / final image's band energy; converged = 1 - band error to final / "
            "final band energy; averaged over pairs"
        ),
        **frequency_curves(spectra, cutoff),
    }
    result["prompts"] = list(prompts)
    _plot_frequency(result, out / "frequency.png")
    if shown:
        _save_progression(shown, references, num_steps, out / "frequency_progression.png")
    atomic_write_json(out / "frequency.json", result)
    return result


def _same_size_batches(references: Sequence[torch.Tensor], batch_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` runs of at most ``batch_size`` consecutive references of one size."""
    runs: list[tuple[int, int]] = []
    start = 0
    for index in range(1, len(references) + 1):
        if (
            index == len(references)
            or index - start >= batch_size
            or references[index].shape != references[start].shape
        ):
            runs.append((start, index))
            start = index
    return runs


def frequency_pairs(
    source: str,
    num_pairs: int,
    image_size: int,
    seed: int = 0,
    dreambench_root: str | Path | None = None,
    policy=None,
) -> tuple[list[str], torch.Tensor | list[torch.Tensor], list[int]]:
    """(prompts, references, seeds) of ``num_pairs`` (reference, prompt) pairs drawn without replacement
    (seeded) from the mini world's held-out set or from DreamBench. References: ``[B, 3, S, S]`` squares of
    ``image_size``, or with ``policy`` a list of ``[3, h, w]`` as the policy prepares them
    (:meth:`~cgrpo.policy.base.Policy.prepare_references`)."""
    from cgrpo.eval.runner import item_seed
    from cgrpo.imaging import square_resize

    if source == "mini":
        from cgrpo.eval.mini import mini_task

        task = mini_task(None, image_size=image_size, num_subjects=64, prompts_per_kind=2)
    elif source == "dreambench":
        from cgrpo.eval.dreambench import dreambench_task

        task = dreambench_task(dreambench_root)
    else:
        raise ValueError(f"pairs source must be 'mini' or 'dreambench', got {source!r}")
    if num_pairs < 1:
        raise ValueError(f"--num-pairs must be at least 1, got {num_pairs}")
    order = np.random.default_rng(seed).permutation(len(task.cases))[:num_pairs]
    cases = [task.cases[i] for i in sorted(order)]
    prompts, seeds = [c.prompt for c in cases], [item_seed(seed, c.subject, c.prompt, 0) for c in cases]
    if policy is not None:
        return prompts, [policy.prepare_references([task.reference(c.subject)])[0] for c in cases], seeds
    references = torch.stack([square_resize(task.reference(c.subject), image_size) for c in cases])
    return prompts, references, [item_seed(seed, c.subject, c.prompt, 0) for c in cases]


def _save_progression(
    shown: list[list[torch.Tensor]], references: torch.Tensor, num_steps: int, path: Path, columns: int = 10
) -> Path:
    """Fig. 4 (left): reference, then x0_hat at up to ``columns`` evenly spaced steps (the last included),
    one row per shown sample; tiles are at most 128 px."""
    from cgrpo.imaging import grid, save_png, square_resize

    steps = sorted({int(round(t)) for t in np.linspace(0, num_steps - 1, min(num_steps, columns))})
    tiles = [torch.cat([batch[t] for batch in shown]) for t in steps]
    size = min(128, tiles[0].shape[-1])
    fit = lambda images: torch.stack([square_resize(image, size) for image in images])  # noqa: E731
    grid_columns = [fit([r.float() for r in references[: len(tiles[0])]])] + [fit(tile) for tile in tiles]
    return save_png(grid(grid_columns, scale=max(1, 96 // size)), path)


def _plot_frequency(result: dict[str, Any], path: Path) -> Path:
    steps = np.arange(result["num_steps"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, kind, title in zip(
        axes, ("normalised", "converged"), ("band energy / final", "band content formed"), strict=True
    ):
        ax.plot(
            steps,
            result[f"low_{kind}"],
            "o-",
            color="C0",
            label=f"low (r ≤ {result['cutoff_cycles_per_pixel']})",
        )
        ax.plot(steps, result[f"high_{kind}"], "s-", color="C3", label="high")
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xlabel("denoising step (0 = pure noise)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"frequency content of x0_hat over {result['num_pairs']} (reference, prompt) pairs",
        fontsize=10,
        y=1.02,
    )
    return save_figure(fig, path)


# --- identity / prompt trade-off ------------------------------------------------------------------------

IDENTITY_PREFERENCE = ("dino_seg", "dino", "clip_i", "mini_id", "id")
PROMPT_PREFERENCE = ("hpsv3", "clip_t", "mini_prompt", "prompt")


def _pick(
    available: Sequence[str], wanted: str | None, preference: Sequence[str], what: str, where: Path
) -> str:
    if wanted is not None:
        if wanted not in available:
            raise KeyError(
                f"{where}: no metric {wanted!r} for the {what} axis; it has {', '.join(available)}"
            )
        return wanted
    for name in preference:
        if name in available:
            return name
    raise KeyError(f"{where}: none of {', '.join(preference)} for the {what} axis; pass --{what[0]} NAME")


def load_points(path: str | Path, x: str | None = None, y: str | None = None) -> list[dict[str, Any]]:
    """Trade-off points of one directory.

    - an evaluation directory (``summary.json`` with ``metrics``): one point, the method, with its 95% CIs;
    - a training run (``summary.json`` with ``base``/``trained``, or ``metrics.jsonl``): the base, every
      held-out evaluation logged during training (``eval/<metric>``) and the trained policy; only the base
      and the final point are candidates for the front (``final``), the others draw the run's path.
    """
    path = Path(path)
    summary_path = path / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if "metrics" in summary:
        available = list(summary["metrics"])
        mx = _pick(available, x, IDENTITY_PREFERENCE, "x", path)
        my = _pick(available, y, PROMPT_PREFERENCE, "y", path)
        sx, sy = summary["metrics"][mx], summary["metrics"][my]
        return [
            {
                "label": summary.get("method") or path.name,
                "source": str(path),
                "kind": "eval",
                "x_metric": mx,
                "y_metric": my,
                "x": sx["mean"],
                "y": sy["mean"],
                "x_ci": [sx.get("ci_low"), sx.get("ci_high")],
                "y_ci": [sy.get("ci_low"), sy.get("ci_high")],
                "final": True,
            }
        ]
    points = []
    name = path.name
    metrics_path = path / "metrics.jsonl"
    records = read_jsonl(metrics_path) if metrics_path.is_file() else []
    if "base" in summary or records:
        base, trained = summary.get("base", {}), summary.get("trained", {})
        available = sorted(
            set(base) | set(trained) | {k[5:] for r in records for k in r if k.startswith("eval/")}
        )
        mx = _pick(available, x, IDENTITY_PREFERENCE, "x", path)
        my = _pick(available, y, PROMPT_PREFERENCE, "y", path)

        def point(label: str, values: dict[str, Any], step: int | None, final: bool) -> dict[str, Any]:
            return {
                "label": label,
                "source": str(path),
                "kind": "run",
                "step": step,
                "x_metric": mx,
                "y_metric": my,
                "x": values.get(mx),
                "y": values.get(my),
                "final": final,
            }

        if base:
            points.append(point(f"{name} (base)", base, 0, True))
        evals = [r for r in records if f"eval/{mx}" in r and f"eval/{my}" in r]
        for r in evals[:-1] if trained else evals:
            points.append(
                point(f"{name} @ {r['step']}", {mx: r[f"eval/{mx}"], my: r[f"eval/{my}"]}, r["step"], False)
            )
        if trained:
            last = evals[-1]["step"] if evals else None
            points.append(point(name, trained, last, True))
        elif evals:
            points[-1]["final"] = True
            points[-1]["label"] = name
    if not points:
        raise FileNotFoundError(f"{path}: no summary.json (evaluation or run) and no metrics.jsonl")
    return points


def tradeoff_analysis(
    paths: Sequence[str | Path],
    out: str | Path,
    x: str | None = None,
    y: str | None = None,
    name: str = "tradeoff",
) -> dict[str, Any]:
    """Identity (x) vs prompt (y) of several runs/evaluations -> ``<name>.json`` and ``<name>.png``.

    The Pareto front (both maximised) is taken over the final points (evaluations, and base + trained of
    runs). Base points that several runs share (same values) are listed once. All points must use the same
    two metrics (a run's held-out ``id`` is not on DreamBench's DINO scale).
    """
    out = Path(out)
    points: list[dict[str, Any]] = []
    for path in paths:
        for p in load_points(path, x, y):
            if (
                p["kind"] == "run"
                and p.get("step") == 0
                and any(
                    q.get("step") == 0 and q["final"] and (q["x"], q["y"]) == (p["x"], p["y"]) for q in points
                )
            ):
                # Runs from the same base share one base point; the copy only starts this run's path.
                p.update(final=False, shared_base=True)
            points.append(p)
    axes_used = {(p["x_metric"], p["y_metric"]) for p in points}
    if len(axes_used) > 1:
        used = "; ".join(f"{a} vs {b}" for a, b in sorted(axes_used))
        raise ValueError(
            f"the inputs measure different metrics ({used}): pass --x and --y that all of them have"
        )
    finals = [i for i, p in enumerate(points) if p["final"]]
    front_local = pareto_front([(_num(points[i]["x"]), _num(points[i]["y"])) for i in finals])
    front = [finals[i] for i in front_local]
    for i, p in enumerate(points):
        p["on_front"] = i in front
    result = {
        "x_metric": sorted({a for a, _ in axes_used}),
        "y_metric": sorted({b for _, b in axes_used}),
        "points": points,
        "front": [points[i]["label"] for i in front],
    }
    _plot_tradeoff(result, out / f"{name}.png")
    atomic_write_json(out / f"{name}.json", result)
    return result


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else float("nan")


# The paper's named methods get their name on the plot; every other point only its number.
NAMED_METHODS = frozenset({"base", "sft", "rpo", "naive_1to1", "naive_1to1.5", "customized_grpo"})


def _label_named(ax: Any, named: list[tuple[str, dict[str, Any], str]], points: list[dict[str, Any]]) -> None:
    """Names of the paper's methods, each moved off the crowd of points (out from their centroid, in axis
    units; up and right from inside it) and tied to its point by a thin line."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    finite = [p for p in points if math.isfinite(_num(p["x"])) and math.isfinite(_num(p["y"]))]
    if not finite:
        return
    cx = sum((_num(p["x"]) - x0) / (x1 - x0) for p in finite) / len(finite)
    cy = sum((_num(p["y"]) - y0) / (y1 - y0) for p in finite) / len(finite)
    crowded = 0
    for text, p, color in named:
        dx, dy = (_num(p["x"]) - x0) / (x1 - x0) - cx, (_num(p["y"]) - y0) / (y1 - y0) - cy
        norm = math.hypot(dx, dy)
        if norm > 0.25:  # outside the crowd: straight out from it
            offset = (34 * dx / norm, 26 * dy / norm)
        else:  # inside it: up and right, where no trade-off point can be (above the front), one row each
            offset = (60.0, 30.0 + 13.0 * crowded)
            crowded += 1
        dx, dy = offset
        ax.annotate(
            text,
            (p["x"], p["y"]),
            textcoords="offset points",
            xytext=offset,
            ha="left" if dx >= 0 else "right",
            va="bottom" if dy >= 0 else "top",
            fontsize=7.5,
            fontweight="bold",
            color=color,
            arrowprops={"arrowstyle": "-", "color": color, "lw": 0.6, "alpha": 0.7},
        )


def _plot_tradeoff(result: dict[str, Any], path: Path) -> Path:
    """Every final point numbered, with the numbers' labels listed beside the axes: runs of one world sit
    close together, and text labels on the points would overlap. Axis limits include the error bars."""
    fig, (ax, key) = plt.subplots(1, 2, figsize=(9.0, 4.8), gridspec_kw={"width_ratios": [3, 1.25]})
    points = result["points"]
    by_source: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for p in points:
        by_source[p["source"]].append(p)
    entries: list[str] = []
    named: list[tuple[str, dict[str, Any], str]] = []  # labelled after the limits are known
    extent_x: list[float] = []
    extent_y: list[float] = []
    for color, (_, group) in enumerate(by_source.items()):
        path_points = [p for p in group if p["kind"] == "run"]
        if len(path_points) > 1:
            ax.plot(
                [_num(p["x"]) for p in path_points],
                [_num(p["y"]) for p in path_points],
                "-",
                color=f"C{color % 10}",
                alpha=0.35,
                lw=1,
            )
        for p in group:
            if not p["final"]:
                continue
            xerr = yerr = None
            if p.get("x_ci") and None not in p["x_ci"]:
                xerr = [[p["x"] - p["x_ci"][0]], [p["x_ci"][1] - p["x"]]]
                extent_x += list(p["x_ci"])
            if p.get("y_ci") and None not in p["y_ci"]:
                yerr = [[p["y"] - p["y_ci"][0]], [p["y_ci"][1] - p["y"]]]
                extent_y += list(p["y_ci"])
            extent_x.append(_num(p["x"]))
            extent_y.append(_num(p["y"]))
            marker = "*" if p["on_front"] else "o"
            ax.errorbar(
                p["x"],
                p["y"],
                xerr=xerr,
                yerr=yerr,
                fmt=marker,
                color=f"C{color % 10}",
                ms=11 if p["on_front"] else 6,
                capsize=2,
                lw=0.8,
            )
            entries.append(p["label"])
            if p["label"] in NAMED_METHODS:
                named.append((f"{len(entries)} {p['label']}", p, f"C{color % 10}"))
            else:
                ax.annotate(
                    str(len(entries)),
                    (p["x"], p["y"]),
                    textcoords="offset points",
                    xytext=(4, 3),
                    fontsize=7,
                    color=f"C{color % 10}",
                )
    front = sorted((p for p in points if p["on_front"]), key=lambda p: p["x"])
    if len(front) > 1:
        ax.step(
            [p["x"] for p in front],
            [p["y"] for p in front],
            where="pre",
            color="k",
            ls="--",
            lw=1,
            label="Pareto front (*)",
        )
        ax.legend(fontsize=8, loc="lower left")
    for limits, setter in ((extent_x, ax.set_xlim), (extent_y, ax.set_ylim)):
        finite = [v for v in limits if math.isfinite(v)]
        if finite:
            low, high = min(finite), max(finite)
            pad = max(high - low, 1e-3) * 0.08
            setter(low - pad, high + pad)
    _label_named(ax, named, [p for p in points if p["final"]])
    key.axis("off")
    key.text(
        0.0,
        1.0,
        "\n".join(f"{i:>2}  {label}" for i, label in enumerate(entries, start=1)),
        va="top",
        ha="left",
        fontsize=7.5 if len(entries) <= 30 else 6,
        family="monospace",
        transform=key.transAxes,
    )
    ax.set_xlabel(f"identity: {', '.join(result['x_metric'])} ↑")
    ax.set_ylabel(f"prompt: {', '.join(result['y_metric'])} ↑")
    ax.set_title("identity vs prompt following (bars: spread)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
