"""The evaluation path's metrics, checked independently.

- CLIP-T and CLIP-I in ``scores.csv`` (written by ``cgrpo eval mini``) agree with torchmetrics' CLIP score on
  the same tiny CLIP and the same PNG files, up to torchmetrics' factor of 100. torchmetrics 1.9 expects
  transformers-4 ``get_*_features`` (tensors); a small adapter computes them the transformers-4 way
  (projection of the pooled output), independently of our reward's code.
- DINO and CLIP-I give 1.0 when the generated image is the reference and less for another subject.
- The mini evaluation reports per prompt kind.
"""

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cgrpo.eval import runner
from cgrpo.eval.cli import eval_app

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambench"


class Transformers4Clip(torch.nn.Module):
    """``get_image_features``/``get_text_features`` returning projected pooled tensors (torchmetrics' API)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, pixel_values):
        return self.model.visual_projection(self.model.vision_model(pixel_values=pixel_values).pooler_output)

    def get_text_features(self, input_ids, attention_mask=None):
        out = self.model.text_model(input_ids=input_ids, attention_mask=attention_mask)
        return self.model.text_projection(out.pooler_output)


def _uint8(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).contiguous()


def test_mini_eval_clip_scores_match_torchmetrics(eval_models, tmp_path):
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update, clip_score
    from transformers import CLIPModel, CLIPProcessor

    out = tmp_path / "mini"
    args = ["mini", "--out", str(out), "-P", f"path={eval_models['policy']}", "--image-size", "16"]
    args += ["--num-subjects", "2", "--images-per-prompt", "1", "--steps", "2", "--device", "cpu"]
    args += [
        "--metrics",
        "mini_id,mini_prompt,clip_i,clip_t",
        "-M",
        f"clip.path={eval_models['clip']['path']}",
    ]
    result = CliRunner().invoke(eval_app, args)
    assert result.exit_code == 0, result.output

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["per_category"]) == {"plain", "context", "placement", "property", "combo"}
    assert summary["n_images"] == 10 and summary["n_subjects"] == 2
    with (out / "scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert all(0.0 <= float(r["mini_id"]) <= 1.0 for r in rows)

    model = Transformers4Clip(CLIPModel.from_pretrained(eval_models["clip"]["path"]))
    processor = CLIPProcessor.from_pretrained(eval_models["clip"]["path"])
    images = [_uint8(out / r["image"]) for r in rows]
    references = [_uint8(out / r["reference"]) for r in rows]
    prompts = [r["prompt"] for r in rows]
    with torch.no_grad():
        clip_t, _ = _clip_score_update(images, prompts, model, processor)
        clip_i, _ = _clip_score_update(images, references, model, processor)
        public = clip_score(images, references, lambda: (model, processor))
    ours_t = torch.tensor([float(r["clip_t"]) for r in rows])
    ours_i = torch.tensor([float(r["clip_i"]) for r in rows])
    torch.testing.assert_close(clip_t / 100, ours_t, atol=2e-5, rtol=0)
    torch.testing.assert_close(clip_i / 100, ours_i, atol=2e-5, rtol=0)
    # The public CLIPScore is the clamped mean, x100.
    assert float(public) == pytest.approx(100 * max(float(ours_i.mean()), 0.0), abs=2e-3)


@pytest.mark.skipif(not (ROOT / "prompts_and_classes.txt").is_file(), reason="no DreamBench copy")
def test_identity_metrics_are_one_for_the_reference_and_lower_for_another_subject(
    eval_models, tmp_path, monkeypatch
):
    from cgrpo.eval.dreambench import dreambench_task
    from cgrpo.eval.runner import GenerationSettings, run_benchmark

    task = dreambench_task(ROOT, subjects=["dog", "backpack"], prompts_per_subject=1)
    from cgrpo.imaging import square_resize
    from cgrpo.sde import flux_sigmas

    # generate_images is replaced below: the stand-in only answers what the runner asks around it
    fake_policy = SimpleNamespace(
        latent_shape=(16, 48),
        image_size=(64, 64),
        sigmas=lambda num_steps=None: flux_sigmas(num_steps or 2, shift=1.0),
        prepare_references=lambda images: [square_resize(image, 64) for image in images],
    )
    options = {"dino": eval_models["dino"], "clip_i": eval_models["clip"]}

    def run(out: Path, swap: bool) -> list[dict]:
        def copy_reference(policy, prompts, references, seeds, sigmas):
            return references.flip(0) if swap else references  # "generate" the reference (or the other one)

        monkeypatch.setattr(runner, "generate_images", copy_reference)
        run_benchmark(
            task,
            out,
            GenerationSettings(policy="fake", steps=2),
            ["dino", "clip_i"],
            options,
            images_per_prompt=1,
            batch_size=2,
            policy_factory=lambda: fake_policy,
            progress=False,
        )
        with (out / "scores.csv").open() as handle:
            return list(csv.DictReader(handle))

    same = run(tmp_path / "same", swap=False)
    other = run(tmp_path / "other", swap=True)
    for metric in ("dino", "clip_i"):
        assert [float(r[metric]) for r in same] == pytest.approx([1.0, 1.0], abs=1e-5)
        assert all(float(r[metric]) < 0.999 for r in other)
