"""Atomic checkpoints: keep-last-k, a failed save leaves the previous checkpoint intact."""

import pytest
import torch
from torch import nn

from cgrpo.io import atomic_write_text
from cgrpo.train import checkpoint as ckpt
from cgrpo.train.components import BatchSampler


def _model():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].requires_grad_(False)  # only the second layer is "trainable", like a LoRA
    return model


def test_save_load_round_trip_and_keep_last(tmp_path):
    model = _model()
    for step in (10, 20, 30):
        with torch.no_grad():
            model[1].weight.fill_(step)
        ckpt.save_checkpoint(tmp_path, step, model, {"note": step}, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000020", "step-000030"]
    fresh = _model()
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path), fresh)
    assert state["step"] == 30 and state["note"] == 30
    assert torch.equal(fresh[1].weight, torch.full_like(fresh[1].weight, 30))
    # frozen parameters are not stored
    assert "0.weight" not in ckpt.trainable_state_dict(model)


def test_failed_save_keeps_previous(tmp_path, monkeypatch):
    model = _model()
    ckpt.save_checkpoint(tmp_path, 1, model, {}, keep_last=1)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        ckpt.save_checkpoint(tmp_path, 2, model, {}, keep_last=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000001"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp dir left behind"


def test_incomplete_checkpoint_is_ignored(tmp_path):
    model = _model()
    ckpt.save_checkpoint(tmp_path, 5, model, {}, keep_last=3)
    (tmp_path / "step-000009").mkdir()  # a crash mid-write without COMPLETE
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000005"


def test_atomic_write_text_failure_keeps_old(tmp_path, monkeypatch):
    target = tmp_path / "report.md"
    atomic_write_text(target, "old")
    monkeypatch.setattr("os.replace", lambda *a: (_ for _ in ()).throw(PermissionError("denied")))
    with pytest.raises(PermissionError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"


def test_batch_sampler_resumes_exactly():
    full = BatchSampler(size=10, batch_size=4, seed=3)
    expected = [full.next() for _ in range(6)]
    first = BatchSampler(size=10, batch_size=4, seed=3)
    got = [first.next() for _ in range(2)]
    second = BatchSampler(size=10, batch_size=4, seed=3)
    second.load_state_dict(first.state_dict())
    got += [second.next() for _ in range(4)]
    assert got == expected
    # every epoch covers every index once
    flat = [i for batch in expected for i in batch][:20]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
