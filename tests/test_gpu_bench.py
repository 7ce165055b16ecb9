"""benchmarks/gpu_iteration.py: the --tiny CPU run of the full-size code path, FLOPs, the no-CUDA exit."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_iteration.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_iteration", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_iteration"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_iteration", None)


def test_tiny_run_writes_json(bench, tmp_path, capsys):
    out = tmp_path / "tiny.json"
    assert bench.main(["--tiny", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert result["tiny"] and result["seconds_per_iteration"] > 0
    assert result["rollout_s"] > 0 and result["train_s"] > 0
    assert result["tokens"] == {"image": 16, "reference": 16, "text": 8}
    assert result["flops"]["model_per_iteration"] > result["flops"]["rollout"] > 0
    assert result["lora_parameters"] > 0 and result["mfu"] is None


def test_linear_flops_match_a_counted_forward(bench):
    """The analytic linear FLOPs equal 2 * in * out * rows summed by hooks over a real forward (no LoRA)."""
    from diffusers import FluxTransformer2DModel

    config = bench.TINY
    model = FluxTransformer2DModel(**config).eval()
    counted = []

    def hook(module, inputs, output):
        counted.append(2 * module.in_features * module.out_features * inputs[0].numel() // module.in_features)

    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(hook)
    image, reference, text = 16, 16, 8
    with torch.no_grad():
        model(
            hidden_states=torch.randn(1, image + reference, config["in_channels"]),
            encoder_hidden_states=torch.randn(1, text, config["joint_attention_dim"]),
            pooled_projections=torch.randn(1, config["pooled_projection_dim"]),
            timestep=torch.tensor([0.5]),
            guidance=torch.tensor([4.0]),
            img_ids=torch.zeros(image + reference, 3),
            txt_ids=torch.zeros(text, 3),
        )
    assert bench.forward_flops(config, image, reference, text)["linear"] == sum(counted)


def test_flux_dev_size(bench):
    flops = bench.forward_flops(bench.FLUX_DEV, 1024, 1024, 512)
    # 8.6B token-wise linear parameters (the other ~3.2B are per-sample modulation) x 2 x ~1.9k effective
    # tokens (the text stream of the double blocks sees only 512): ~33 TFLOP of linears per sample.
    assert 3.2e13 < flops["linear"] < 3.4e13
    assert flops["attention"] == 4 * 2560**2 * 3072 * 57


def test_exits_cleanly_without_cuda(bench, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--out", str(tmp_path / "x.json")]) == 0
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
