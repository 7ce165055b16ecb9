"""DreamBench evaluation end to end on CPU: tiny random policy and metric models, the real prompt file.

Generation included, on a subset of subjects and prompts; resume is checked by counting generated images
and metric builds.
"""

import csv
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cgrpo.data.dreambench import parse_prompts_and_classes, render
from cgrpo.eval import metrics as metric_module
from cgrpo.eval import runner
from cgrpo.eval.cli import eval_app
from cgrpo.eval.dreambench import ENV_VAR, dreambench_cases, find_root

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambench"
pytestmark = pytest.mark.skipif(not (ROOT / "prompts_and_classes.txt").is_file(), reason="no DreamBench copy")


def _args(eval_models, out, *extra):
    return [
        "dreambench",
        "--out",
        str(out),
        "--policy",
        "mini",
        "-P",
        f"path={eval_models['policy']}",
        "--dreambench-root",
        str(ROOT),
        "--subjects",
        "dog,backpack",
        "--prompts-per-subject",
        "2",
        "--images-per-prompt",
        "2",
        "--metrics",
        "dino,clip_i,clip_t",
        "-M",
        f"dino.path={eval_models['dino']['path']}",
        "-M",
        f"clip.path={eval_models['clip']['path']}",
        "--steps",
        "2",
        "--batch-size",
        "3",
        "--device",
        "cpu",
        *extra,
    ]


def test_prompt_file_parses_to_30_subjects_and_25_prompts_each():
    spec = parse_prompts_and_classes(ROOT / "prompts_and_classes.txt")
    assert len(spec.classes) == 30 and len(spec.object_prompts) == 25 and len(spec.live_prompts) == 25
    cases = dreambench_cases(ROOT)
    assert len(cases) == 750
    live = {c.subject for c in cases if c.category == "live"}
    assert live == {"cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"}
    assert render(spec.object_prompts[0], "backpack") == "a backpack in the jungle"
    assert render(spec.live_prompts[10], "dog", "sks") == "a sks dog wearing a red hat"
    kinds = {(c.category, c.kind) for c in cases}
    assert ("live", "accessory") in kinds and ("object", "property") in kinds


def test_root_resolution_and_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(ROOT))
    assert find_root() == ROOT
    monkeypatch.delenv(ENV_VAR)
    assert (find_root() / "prompts_and_classes.txt").is_file()  # shared/data/dreambench next to the repo
    with pytest.raises(Exception, match="prompts_and_classes.txt"):
        find_root(tmp_path)
    with pytest.raises(Exception, match="unknown DreamBench subject"):
        dreambench_cases(ROOT, subjects=["unicorn"])


def test_images_do_not_depend_on_the_batch(eval_models):
    from cgrpo.sde import flux_sigmas
    from cgrpo.testing.policies import tiny_policy_for_tests

    policy = tiny_policy_for_tests()
    sigmas = flux_sigmas(2, image_seq_len=policy.latent_shape[0])
    refs = torch.rand(3, 3, 16, 16)
    prompts = ["a red cube", "a blue ball", "a star"]
    together = runner.generate_images(policy, prompts, refs, [11, 12, 13], sigmas)
    alone = runner.generate_images(policy, prompts[1:2], refs[1:2], [12], sigmas)
    torch.testing.assert_close(together[1:2], alone, atol=1e-5, rtol=1e-5)
    assert runner.item_seed(0, "dog", "a dog", 1) == runner.item_seed(0, "dog", "a dog", 1)
    assert runner.item_seed(0, "dog", "a dog", 1) != runner.item_seed(1, "dog", "a dog", 1)


def test_dreambench_end_to_end_and_resume(eval_models, tmp_path, monkeypatch):
    generated, built = [], []
    real_generate, real_build = runner.generate_images, metric_module.build_metric

    def counting_generate(policy, prompts, references, seeds, sigmas):
        generated.extend(seeds)
        return real_generate(policy, prompts, references, seeds, sigmas)

    def counting_build(name, options=None, device=None):
        built.append(name)
        return real_build(name, options, device)

    monkeypatch.setattr(runner, "generate_images", counting_generate)
    monkeypatch.setattr(metric_module, "build_metric", counting_build)
    out = tmp_path / "eval"
    cli = CliRunner()

    result = cli.invoke(eval_app, _args(eval_models, out))
    assert result.exit_code == 0, result.output
    assert len(generated) == 8 and sorted(built) == ["clip_i", "clip_t", "dino"]
    images = sorted(out.glob("images/*/*/*.png"))
    assert len(images) == 8
    assert (out / "images" / "dog" / "a-dog-in-the-jungle" / "1.png").is_file()

    with (out / "scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8
    for column in ("subject", "class", "category", "prompt", "seed", "image", "reference", "dino", "clip_i"):
        assert column in rows[0]
    assert {r["category"] for r in rows} == {"live", "object"}
    assert all((out / r["image"]).is_file() and Path(r["reference"]).is_file() for r in rows)
    assert all(-1.0 <= float(r["clip_t"]) <= 1.0 for r in rows)
    assert len({(r["subject"], r["prompt"], r["seed"]) for r in rows}) == 8

    summary = json.loads((out / "summary.json").read_text())
    dino = [float(r["dino"]) for r in rows]
    assert summary["metrics"]["dino"]["mean"] == pytest.approx(sum(dino) / len(dino), rel=1e-5)
    stat = summary["metrics"]["dino"]
    assert stat["ci_low"] <= stat["mean"] <= stat["ci_high"]
    assert set(summary["per_category"]) == {"live", "object"}
    table = (out / "table.md").read_text()
    assert "| DINO ↑ | CLIP-I ↑ | CLIP-T ↑ |" in table and "overall" in table and "live" in table
    assert f"{stat['mean']:.3f}" in table
    assert (out / "samples.png").is_file()

    # Resume: nothing to generate (the policy is not even built), every score reused.
    generated.clear(), built.clear()
    result = cli.invoke(eval_app, _args(eval_models, out))
    assert result.exit_code == 0, result.output
    assert generated == [] and built == []
    with (out / "scores.csv").open() as handle:
        assert [r["dino"] for r in csv.DictReader(handle)] == [r["dino"] for r in rows]

    # A deleted image is regenerated alone, identical to before, and only its scores are recomputed.
    victim = out / rows[3]["image"]
    before = victim.read_bytes()
    victim.unlink()
    result = cli.invoke(eval_app, _args(eval_models, out))
    assert result.exit_code == 0, result.output
    assert generated == [int(rows[3]["seed"])]
    assert victim.read_bytes() == before
    assert sorted(built) == ["clip_i", "clip_t", "dino"]

    # Changing what generates the images is refused with a clear message.
    result = cli.invoke(eval_app, _args(eval_models, out, "--seed", "5"))
    assert result.exit_code == 2
    assert "seed=0" in result.output and "another --out" in result.output.replace("\n", " ")


def test_unknown_metric_and_bad_option_are_one_line_errors(eval_models, tmp_path):
    cli = CliRunner()
    args = _args(eval_models, tmp_path / "e")
    bad_metric = list(args)
    bad_metric[bad_metric.index("dino,clip_i,clip_t")] = "dino,nope"
    result = cli.invoke(eval_app, bad_metric)
    assert result.exit_code == 2 and "nope" in result.output
    assert not (tmp_path / "e" / "images").exists()  # refused before generating anything
    result = cli.invoke(eval_app, [*args, "-M", "hpsv3.path=/x"])
    assert result.exit_code == 2 and "hpsv3" in result.output


def test_lora_of_a_run_is_found_and_loaded(eval_models, tmp_path):
    from cgrpo.config import ConfigError
    from cgrpo.testing.policies import tiny_policy_for_tests

    policy = tiny_policy_for_tests()
    policy.add_lora(rank=2, alpha=2)
    policy.save_lora(tmp_path / "run" / "final")
    assert runner.resolve_lora(tmp_path / "run") == (tmp_path / "run" / "final").resolve()
    settings = runner.GenerationSettings(
        "mini", {"path": str(eval_models["policy"])}, str(tmp_path / "run" / "final")
    )
    assert runner.build_eval_policy(settings).has_lora
    assert runner._default_method(settings) == "mini@policy+run"
    with pytest.raises(ConfigError, match="adapter_model.safetensors"):
        runner.resolve_lora(tmp_path)
    with pytest.raises(ConfigError, match="--policy-option path="):
        runner.resolve_lora(eval_models["policy"])
