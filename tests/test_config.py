"""Config loading: unknown keys, wrong types and impossible values name the key."""

from pathlib import Path

import pytest

from cgrpo.config import ConfigError, apply_overrides, load_config, save_config
from cgrpo.train.config import GRPOConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "mini"


def test_packaged_mini_configs_load():
    from cgrpo.train.sft import SFTConfig

    for path in sorted(CONFIGS.glob("**/*.yaml")):
        if path.name.startswith("rpo"):  # RPO configs have their own schema
            continue
        if path.name.startswith("sft"):
            load_config(SFTConfig, path).validate()
            continue
        config = load_config(GRPOConfig, path)
        assert config.train.group_size >= 2, path


def test_inherit_and_overrides(tmp_path):
    overrides = ["train.lr=3e-5", "advantage.ratio=[1, 1.5]"]
    config = load_config(GRPOConfig, CONFIGS / "naive_1to1.yaml", overrides)
    assert config.advantage.synergy == "none" and config.advantage.schedule == "static"
    assert config.train.lr == pytest.approx(3e-5)
    assert config.advantage.ratio == [1.0, 1.5]
    # inherited from customized_grpo.yaml
    parent = load_config(GRPOConfig, CONFIGS / "customized_grpo.yaml")
    assert config.policy.lora.rank == parent.policy.lora.rank


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=1", "unknown key train.lrr"),
        ("train.lr=fast", "train.lr: expected a number"),
        ("train.group_size=1", "train.group_size = 1 is invalid"),
        ("train.train_steps=10", "train.train_steps = 10 is invalid"),
        ("advantage.synergy=cubic", "advantage.synergy: expected one of"),
        ("advantage.w_min=0.9", "advantage.w_min/w_max"),
        ("sampling.noise_level=0", "sampling.noise_level = 0.0 is invalid"),
        ("train.group_size=true", "train.group_size: expected an integer"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(GRPOConfig, None, [override])


def test_bad_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  iterations: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(GRPOConfig, bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(GRPOConfig, tmp_path / "missing.yaml")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("trian: {}\n")
    with pytest.raises(ConfigError, match="unknown.yaml: unknown key trian"):
        load_config(GRPOConfig, unknown)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["train.lr"])


def test_resolved_config_round_trips(tmp_path):
    config = load_config(GRPOConfig, CONFIGS / "customized_grpo.yaml", ["seed=7"])
    save_config(config, tmp_path / "config.yaml")
    again = load_config(GRPOConfig, tmp_path / "config.yaml")
    assert again == config
