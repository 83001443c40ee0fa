"""Shipped configs load and validate; the resolved config round-trips; overrides are typed."""

from pathlib import Path

import pytest

from launcher.config import Config, load_config, to_yaml

from conftest import REPO

SHIPPED = sorted((REPO / "configs").glob("*.yaml"))  # launcher configs; configs/accelerate holds accelerate's own
# configs/examples/ name model folders and data to download first: test_examples.py loads and plans each in such a folder
ACCELERATE = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))
DEEPSPEED = sorted((REPO / "configs" / "deepspeed").glob("*.json"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_config_loads_and_says_how_to_run_it(path: Path, tmp_path: Path, monkeypatch, request):
    if "pretrained: outputs/tiny-llama" in path.read_text():  # the folder its comment says to make first
        (tmp_path / "outputs").mkdir()
        (tmp_path / "outputs" / "tiny-llama").symlink_to(request.getfixturevalue("tiny_hf")["llama"])
    monkeypatch.chdir(tmp_path)  # relative paths resolve here, not in whatever the checkout holds
    config = load_config(path)
    assert isinstance(config, Config)
    comment = path.read_text().splitlines()[:6]
    assert any("launcher train" in line or "accelerate launch" in line for line in comment if line.startswith("#"))


def test_overrides_are_parsed_as_yaml_values(tmp_path: Path):
    config = load_config(
        REPO / "configs" / "default.yaml",
        ["train.max_steps=7", "train.max_grad_norm=null", "train.grad_norm_type=inf", "freeze=[a.*, 're:b']", "model.dropout=0.1"],
    )
    assert config.train.max_steps == 7 and config.train.max_grad_norm is None
    assert config.train.grad_norm_type == float("inf")
    assert config.freeze == ["a.*", "re:b"] and config.model.dropout == 0.1


def test_resolved_config_round_trips(tmp_path: Path):
    config = load_config(REPO / "configs" / "default.yaml", ["train.grad_norm_type=inf", f"output_dir={tmp_path}"])
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(config))
    assert load_config(saved) == config


def test_a_bare_no_in_yaml_means_no_mixed_precision(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 1\n  mixed_precision: no\n")
    assert load_config(path).train.mixed_precision == "no"
    assert load_config(path, ["train.mixed_precision=no"]).train.mixed_precision == "no"


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_shipped_accelerate_config_loads_and_says_how_to_run_it(path: Path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert path.read_text().startswith("# ") and "accelerate launch --config_file configs/accelerate/" + path.name in path.read_text()
    if config.distributed_type == "DEEPSPEED":
        ds_json = REPO / config.deepspeed_config["deepspeed_config_file"]
        assert ds_json.is_file()
        # Accelerate refuses a DeepSpeed JSON next to accelerate-level precision settings
        assert "mixed_precision:" not in path.read_text()


@pytest.mark.parametrize("path", DEEPSPEED, ids=lambda p: p.name)
def test_shipped_deepspeed_json_is_all_auto_for_launcher_values(path: Path):
    from launcher.backends.deepspeed_config import read_deepspeed_json, resolve, zero_stage

    raw = read_deepspeed_json(path)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping"):
        assert raw[key] == "auto", key
    assert raw["fp16"]["enabled"] == "auto" and raw["bf16"]["enabled"] == "auto"
    assert "optimizer" not in raw and "scheduler" not in raw
    cfg = load_config(REPO / "configs" / "default.yaml", ["train.mixed_precision=bf16", "train.max_grad_norm=0.7"])
    resolved = resolve(raw, cfg.train, world_size=8, source=path)
    assert resolved["train_batch_size"] == 8 * 2 * 8 and resolved["gradient_clipping"] == 0.7
    assert resolved["bf16"]["enabled"] is True and resolved["fp16"]["enabled"] is False
    assert zero_stage(resolved) == int(path.stem[4])
    if zero_stage(resolved) == 3:  # the final export gathers full weights
        assert resolved["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
