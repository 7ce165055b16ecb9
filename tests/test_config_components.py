"""Misspelt component names and options are config errors naming the key (exit code 2), caught when the
config loads, before anything is built: GRPO (`cgrpo train`), SFT, RPO and the reproduce plan. Removed
settings name the one that replaces them."""

import pytest
import typer
import yaml
from typer.testing import CliRunner

from cgrpo.cli import app
from cgrpo.config import ConfigError, load_config, save_config
from cgrpo.reproduce.cli import reproduce_command
from cgrpo.reproduce.plan import configs_dir
from cgrpo.train.config import GRPOConfig
from cgrpo.train.rpo import RPOConfig
from cgrpo.train.sft import SFTConfig


def _one_line(output: str) -> str:
    return " ".join(output.split())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "policy.name=nope",
            "policy.name: unknown policy 'nope'; registered: flux-kontext, flux2-klein, mini, uno",
        ),
        (
            "rewards.prompt.name=mini_promt",
            "rewards.prompt.name: unknown reward 'mini_promt' (did you mean 'mini_prompt'?); registered: ",
        ),
        ("rewards.identity.name=dino_sge", "rewards.identity.name: unknown reward 'dino_sge' (did you mean"),
        ("data.name=jsnl", "data.name: unknown dataset 'jsnl' (did you mean 'jsonl'?)"),
        (
            "rewards.identity={name: dino, options: {path: /models/dino, devise: cuda}}",
            "rewards.identity.options.devise: reward 'dino' takes no option 'devise' "
            "(did you mean 'device'?); its options: batch_size, device, dtype, path",
        ),
        ("data.options.eval.num_subject=2", "data.options.eval.num_subject: the mini world takes no option"),
        ("data.options.train.seed=3", "data.options.train.seed: the mini world takes no option 'seed'"),
        ("data.options.imagesize=16", "data.options.imagesize: the mini world takes no option 'imagesize'"),
        ("data={name: jsonl, options: {pth: x.jsonl}}", "data.options.pth: dataset 'jsonl' takes no option"),
        (
            "data={name: jsonl, options: {eval_path: x.jsonl}}",
            "data.options.path: dataset 'jsonl' needs this",
        ),
    ],
)
def test_cli_train_misspelt_component_names_the_key(tmp_path, override, message):
    config = load_config(
        GRPOConfig, configs_dir() / "mini" / "customized_grpo.yaml", [f"output_dir={tmp_path}"]
    )
    save_config(config, tmp_path / "cfg.yaml")
    result = CliRunner().invoke(app, ["train", str(tmp_path / "cfg.yaml"), override])
    assert result.exit_code == 2, result.output
    assert message in _one_line(result.output), result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "metrics.jsonl").exists()


def test_valid_options_of_a_registered_component_load(tmp_path):
    config = load_config(
        GRPOConfig,
        None,
        [
            "rewards.identity={name: dino_seg, options: {dino_path: a, detector_path: b, sam_path: c}}",
            "data={name: jsonl, options: {path: x.jsonl, eval_path: y.jsonl, image_size: 64}}",
        ],
    )
    assert config.rewards.identity.options["sam_path"] == "c"


@pytest.mark.parametrize(
    ("command", "config", "override", "message"),
    [
        (
            "sft",
            "sft_baseline.yaml",
            "model.policy=mnii",
            "model.policy: unknown policy 'mnii' (did you mean 'mini'?)",
        ),
        ("sft", "sft_baseline.yaml", "data.dataset.name=nope", "data.dataset.name: unknown dataset 'nope'"),
        (
            "sft",
            "sft_baseline.yaml",
            "heldout.rewards.prompt.name=mini_promt",
            "heldout.rewards.prompt.name: unknown reward 'mini_promt' (did you mean 'mini_prompt'?)",
        ),
        (
            "rpo",
            "rpo.yaml",
            "rewards.prompt.name=mini_promt",
            "rewards.prompt.name: unknown reward 'mini_promt'",
        ),
        ("rpo", "rpo.yaml", "policy.name=nope", "policy.name: unknown policy 'nope'"),
    ],
)
def test_cli_sft_and_rpo_misspelt_component_names_the_key(tmp_path, command, config, override, message):
    cls = SFTConfig if command == "sft" else RPOConfig
    loaded = load_config(cls, configs_dir() / "mini" / config, [f"output_dir={tmp_path / 'run'}"])
    save_config(loaded, tmp_path / "cfg.yaml")
    result = CliRunner().invoke(app, [command, str(tmp_path / "cfg.yaml"), override])
    assert result.exit_code == 2, result.output
    assert message in _one_line(result.output), result.output
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_reproduce_plan_rejects_a_misspelt_reward_before_running(tmp_path):
    data = yaml.safe_load((configs_dir() / "mini" / "customized_grpo.yaml").read_text())
    data["rewards"]["prompt"]["name"] = "mini_promt"
    (tmp_path / "grpo.yaml").write_text(yaml.safe_dump(data))
    command = typer.Typer()
    command.command()(reproduce_command)
    args = [
        "--quick",
        "--dry-run",
        "--tables",
        "2",
        "--out",
        tmp_path / "out",
        "--grpo-config",
        tmp_path / "grpo.yaml",
    ]
    result = CliRunner().invoke(command, list(map(str, args)), terminal_width=240)
    assert result.exit_code == 2, result.output
    assert "rewards.prompt.name: unknown reward 'mini_promt'" in _one_line(result.output), result.output


def test_registry_error_lists_the_registered_names():
    with pytest.raises(ConfigError, match=r"policy\.name: unknown policy 'nope'; registered: .*mini"):
        load_config(GRPOConfig, None, ["policy.name=nope"])


# --- settings that were never read ------------------------------------------------------------------


@pytest.mark.parametrize("key", ["num_subjects", "prompts_per_kind"])
def test_removed_eval_settings_point_at_the_real_one(tmp_path, key):
    with pytest.raises(ConfigError, match=rf"eval\.{key} .*data\.options\.eval\.{key}"):
        load_config(GRPOConfig, None, [f"eval.{key}=2"])
    with pytest.raises(ConfigError, match=rf"eval\.{key} .*data\.options\.eval\.{key}"):
        load_config(RPOConfig, None, [f"eval.{key}=2"])
    config = load_config(
        GRPOConfig, configs_dir() / "mini" / "customized_grpo.yaml", [f"output_dir={tmp_path}"]
    )
    save_config(config, tmp_path / "cfg.yaml")
    result = CliRunner().invoke(app, ["train", str(tmp_path / "cfg.yaml"), f"eval.{key}=2"])
    assert result.exit_code == 2, result.output
    assert f"data.options.eval.{key}" in _one_line(result.output), result.output


def test_every_shipped_config_loads():
    paths = sorted(configs_dir().glob("**/*.yaml"))
    assert any("uno" in p.parts for p in paths) and any("mini" in p.parts for p in paths)
    for path in paths:
        cls = (
            SFTConfig
            if path.name.startswith("sft")
            else RPOConfig
            if path.name.startswith("rpo")
            else GRPOConfig
        )
        load_config(cls, path)


def test_eval_mini_help_names_the_training_configs_real_settings():
    import click

    command = typer.main.get_command(app)
    with click.Context(command) as context:
        mini = command.get_command(context, "eval").get_command(context, "mini")
    help_of = {param.name: param.help for param in mini.params}
    assert "data.options.eval.num_subjects" in help_of["num_subjects"]
    assert "data.options.eval.prompts_per_kind" in help_of["prompts_per_kind"]
    assert "data.options.eval.seed" in help_of["eval_seed"]
    assert not any("trainer's eval." in (text or "") for text in help_of.values())
