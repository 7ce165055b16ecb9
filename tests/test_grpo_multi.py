"""Multi-subject GRPO, SFT and held-out evaluation with two-subject fakes built on the shared interface
(``Example.references`` / ``subject_classes``; an identity reward with ``score_subjects``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

from cgrpo.advantage import (
    MULTI_SARS_MODES,
    group_normalize,
    group_normalize_columns,
    multi_sars,
    tdw_weights,
)
from cgrpo.config import ConfigError, load_config
from cgrpo.rewards import base as rewards_base
from cgrpo.train import grpo as grpo_module
from cgrpo.train.config import AdvantageConfig, GRPOConfig
from cgrpo.train.grpo import GRPOTrainer
from cgrpo.train.heldout import evaluate_heldout
from cgrpo.train.logger import read_metrics
from cgrpo.train.subjects import (
    SubjectCountError,
    condition_references,
    reference_list,
    references_per_subject,
    subject_count,
)
from tests.test_grpo import tiny_config

needs_dispatch = pytest.mark.skipif(
    not hasattr(rewards_base, "score_subjects"),
    reason="cgrpo.rewards.base.score_subjects (branch i16-data) is not merged yet",
)


@dataclass(frozen=True)
class TwoSubjects:
    """An example with the shared interface's multi-subject fields."""

    id: str
    subject_id: str
    subject_class: str
    prompt: str
    reference: torch.Tensor
    target: torch.Tensor | None = None
    kind: str = ""
    extra_references: tuple[torch.Tensor, ...] = ()
    extra_classes: tuple[str, ...] = field(default=())

    @property
    def references(self):
        return (self.reference, *self.extra_references)

    @property
    def subject_classes(self):
        return (self.subject_class, *self.extra_classes)

    @property
    def num_subjects(self):
        return 1 + len(self.extra_references)


def paired(examples, subjects=2):
    """Each example gets the next examples' references as its 2nd..Kth subjects."""
    out = []
    for i, e in enumerate(examples):
        others = [examples[(i + j) % len(examples)] for j in range(1, subjects)]
        out.append(
            TwoSubjects(
                e.id,
                e.subject_id,
                e.subject_class,
                e.prompt,
                e.reference,
                e.target,
                e.kind,
                tuple(o.reference for o in others),
                tuple(f"{o.subject_class}-{j}" for j, o in enumerate(others, 1)),
            )
        )
    return out


class SubjectReward:
    """Identity per subject: 1 - mean |image - reference|; ``last_assignment`` counts subjects below 0.7 as
    missing and (deterministically) the first image of every call as confused."""

    name = "fake_subjects"

    def __init__(self):
        self.calls = []
        self._last = None

    def __call__(self, images, references, prompts, subjects=None):
        return 1 - (images - references).abs().mean(dim=(1, 2, 3))

    def score_subjects(self, images, references, prompts, subject_classes):
        self.calls.append((len(references), [list(c) for c in subject_classes]))
        scores = torch.stack([self(images, r, prompts) for r in references], dim=1)
        self._last = [
            {"missing": int((row < 0.7).sum()), "confused": int(i == 0)} for i, row in enumerate(scores)
        ]
        return scores

    def last_assignment(self):
        return self._last


def multi_trainer(tiny_policy_dir, tmp_path, monkeypatch, *overrides, subjects=2):
    """A tiny GRPO trainer on two-subject fakes of the mini world's examples."""
    real_build = grpo_module.build_datasets

    def build(config, seed):
        train, heldout = real_build(config, seed)
        return paired([train[i] for i in range(len(train))], subjects), paired(heldout, subjects)

    reward = SubjectReward()
    real_rewards = grpo_module.build_rewards
    monkeypatch.setattr(grpo_module, "build_datasets", build)
    monkeypatch.setattr(grpo_module, "build_rewards", lambda c: (reward, real_rewards(c)[1]))
    config = tiny_config(tiny_policy_dir, tmp_path / "run", "train.iterations=1", *overrides)
    return GRPOTrainer(config), reward


@needs_dispatch
@pytest.mark.parametrize("mode", MULTI_SARS_MODES)
def test_two_subject_advantages_are_multi_sars_of_group_normalised_columns(
    tiny_policy_dir, tmp_path, monkeypatch, mode
):
    trainer, reward = multi_trainer(
        tiny_policy_dir, tmp_path, monkeypatch, f"advantage.multi_subject={mode}", "advantage.eps=0.01"
    )
    seen = {}
    real_score, real_loss, real_condition = (
        trainer._score,
        grpo_module.clipped_policy_loss,
        trainer.policy.condition,
    )

    def spy_score(*args):
        seen["rewards"] = real_score(*args)
        return seen["rewards"]

    def spy_loss(log_prob, old_log_prob, advantages, **kw):
        seen.setdefault("adv", []).append(advantages.detach().clone())
        return real_loss(log_prob, old_log_prob, advantages, **kw)

    def spy_condition(prompts, references):
        seen["references"] = references
        return real_condition(prompts, references)

    monkeypatch.setattr(trainer, "_score", spy_score)
    monkeypatch.setattr(grpo_module, "clipped_policy_loss", spy_loss)
    monkeypatch.setattr(trainer.policy, "condition", spy_condition)
    steps = torch.tensor([2, 0])
    monkeypatch.setattr(trainer, "_select_steps", lambda: steps)
    metrics = trainer.iteration()

    r_ids, r_prompt = seen["rewards"]
    G, a = trainer.config.train.group_size, trainer.config.advantage
    assert r_ids.shape == (2 * G, 2)
    a_ids = group_normalize_columns(r_ids, G, eps=a.eps, std=a.std)
    a_prompt = group_normalize(r_prompt, G, eps=a.eps, std=a.std)
    w_id, w_prompt = tdw_weights(steps, trainer.config.sampling.num_steps)
    expected = multi_sars(a_ids, a_prompt, w_id[None], w_prompt[None], alpha=a.alpha, mode=mode)
    used = torch.cat(seen["adv"]).view(2 * G, len(steps))
    torch.testing.assert_close(used, expected.clamp(-5, 5))
    # every subject scored jointly with its own classes, the policy conditioned on both references
    assert reward.calls[0][0] == 2 and reward.calls[0][1][1][0].endswith("-1")
    assert tuple(seen["references"].shape[:2]) == (2, 2)  # [B, K, 3, H, W]
    for k in range(2):
        assert metrics[f"reward/id_{k}"] == pytest.approx(float(r_ids[:, k].mean()))
    assert metrics["reward/id_min"] == pytest.approx(float(r_ids.amin(dim=1).mean()))
    assert metrics["reward/id"] == pytest.approx(float(r_ids.mean()))
    assert (
        0 <= metrics["conflict_rate/multi"] <= 1
        and metrics["conflict_rate/multi"] >= metrics["conflict_rate"]
    )


@needs_dispatch
def test_two_subject_run_logs_per_subject_metrics_and_heldout(tiny_policy_dir, tmp_path, monkeypatch):
    trainer, _ = multi_trainer(tiny_policy_dir, tmp_path, monkeypatch)
    summary = trainer.train()
    record = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert {"reward/id_0", "reward/id_1", "reward/id_min", "conflict_rate/multi"} <= set(record)
    trained = summary["trained"]
    assert {"id_0", "id_1", "id_min", "missing_rate", "confused_rate"} <= set(trained)
    assert trained["id_min"] <= min(trained["id_0"], trained["id_1"]) + 1e-6
    assert (tmp_path / "run" / "samples" / "eval-step-000000.png").exists()


def test_mixed_subject_counts_are_refused_naming_the_dataset(tiny_policy_dir, tmp_path, monkeypatch):
    real_build = grpo_module.build_datasets

    def build(config, seed):
        train, heldout = real_build(config, seed)
        examples = [train[i] for i in range(len(train))]
        return paired(examples[:3]) + examples[3:], heldout

    monkeypatch.setattr(grpo_module, "build_datasets", build)
    with pytest.raises(SubjectCountError, match=r"dataset mini \(training\).*same number of subjects"):
        GRPOTrainer(tiny_config(tiny_policy_dir, tmp_path / "run"))


@needs_dispatch
def test_heldout_summary_per_subject(tiny_policy_dir):
    from cgrpo.data.miniworld import MiniWorld
    from cgrpo.train.components import build_policy
    from cgrpo.train.config import PolicyConfig

    policy = build_policy(PolicyConfig(name="mini", options={"path": str(tiny_policy_dir)}))
    examples = paired(list(MiniWorld(16, 4, 2).eval_set(num_subjects=2, prompts_per_kind=1))[:3])
    reward = SubjectReward()
    result = evaluate_heldout(
        policy, examples, reward, lambda i, r, p, s=None: torch.zeros(len(p)), torch.linspace(1, 0, 4), 0, 2
    )
    summary = result.summary()
    scores = result.subject_identity
    assert scores.shape == (6, 2)
    assert summary["id_0"] == pytest.approx(float(scores[:, 0].mean()))
    assert summary["id_min"] == pytest.approx(float(scores.amin(dim=1).mean()))
    assert summary["id"] == pytest.approx(float(scores.mean()))
    assert summary["missing_rate"] == pytest.approx(float((scores < 0.7).sum()) / 12)
    assert summary["confused_rate"] == pytest.approx(1 / 12)


def test_single_subject_heldout_summary_has_no_subject_keys(tiny_policy_dir):
    from cgrpo.data.miniworld import MiniWorld
    from cgrpo.train.components import build_policy
    from cgrpo.train.config import PolicyConfig

    policy = build_policy(PolicyConfig(name="mini", options={"path": str(tiny_policy_dir)}))
    examples = list(MiniWorld(16, 4, 2).eval_set(num_subjects=1, prompts_per_kind=1))[:2]
    reward = SubjectReward()
    result = evaluate_heldout(policy, examples, reward, reward, torch.linspace(1, 0, 3), 0)
    assert result.subject_identity is None and not reward.calls  # the plain call, no joint scoring
    assert not {"id_0", "id_min", "missing_rate"} & set(result.summary())


def test_batch_forms_of_references():
    a, b = torch.rand(3, 8, 8), torch.rand(3, 8, 12)
    one = TwoSubjects("x", "s", "dog", "p", a)
    assert torch.equal(condition_references([one, one]), torch.stack([a, a]))
    same = TwoSubjects("x", "s", "dog", "p", a, extra_references=(a * 0.5,), extra_classes=("cat",))
    stacked = condition_references([same, same])
    assert stacked.shape == (2, 2, 3, 8, 8) and torch.equal(stacked[:, 1], torch.stack([a, a]) * 0.5)
    mixed = TwoSubjects("x", "s", "dog", "p", a, extra_references=(b,), extra_classes=("cat",))
    per_subject = condition_references([mixed, mixed])
    assert [tuple(r.shape) for r in per_subject] == [(2, 3, 8, 8), (2, 3, 8, 12)]
    assert [r.shape[0] for r in references_per_subject([mixed, mixed], repeat=3)] == [6, 6]
    assert [tuple(r.shape) for r in reference_list(stacked)] == [(2, 3, 8, 8)] * 2


def test_subject_count_reads_file_datasets_from_their_records():
    @dataclass
    class Record:
        id: str
        subjects: tuple

    class Records:
        records = [Record("a", (1, 2)), Record("b", (1, 2)), Record("c", (1,))]

        def __getitem__(self, index):
            raise AssertionError("images must not be decoded to count subjects")

    with pytest.raises(SubjectCountError, match=r"dataset pairs.jsonl: .*'a' has 2, example 'c' has 1"):
        subject_count(Records(), "pairs.jsonl")
    Records.records = Records.records[:2]
    assert subject_count(Records(), "pairs.jsonl") == 2


def test_multi_subject_mode_is_validated_and_matches_the_advantage_modes():
    assert AdvantageConfig().multi_subject == "mean"
    from typing import get_args, get_type_hints

    assert get_args(get_type_hints(AdvantageConfig)["multi_subject"]) == MULTI_SARS_MODES
    with pytest.raises(ConfigError, match="advantage.multi_subject"):
        load_config(GRPOConfig, None, ["advantage.multi_subject=median"])


def test_sft_conditions_on_both_references(tiny_policy_dir, tmp_path):
    from cgrpo.data.miniworld import MiniWorld
    from cgrpo.policy.flux import ReferenceFluxPolicy
    from cgrpo.train.sft import SFTConfig, run_sft

    world = MiniWorld(16, 6, 2)
    train = paired(list(world.dataset("train", prompts_per_subject=1)))
    preview = paired(list(world.eval_set(num_subjects=2, prompts_per_kind=1))[:2])
    policy = ReferenceFluxPolicy.from_pretrained(tiny_policy_dir)
    seen = []
    real = policy.encode_references
    policy.encode_references = lambda refs: (seen.append(refs), real(refs))[1]
    config = load_config(
        SFTConfig,
        None,
        [
            f"output_dir={tmp_path / 'sft'}",
            "optim.steps=2",
            "optim.batch_size=2",
            "eval_every=2",
            "save_every=0",
            "sample_steps=2",
            "progress=false",
            "num_threads=1",
        ],
    )
    final = run_sft(config, policy=policy, train_data=train, eval_data=preview)
    assert (final / "config.json").exists() or any(final.iterdir())
    assert all(r.shape[:2] == (2, 2) for r in seen)  # [B, K=2, 3, H, W] in every loss and preview
    assert (tmp_path / "sft" / "samples" / "step_000002.png").exists()
    assert not math.isnan(read_metrics(tmp_path / "sft" / "metrics.jsonl")[0]["train/loss"])
