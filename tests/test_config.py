"""Shipped configs load and validate; the resolved config round-trips; overrides are typed."""

from pathlib import Path

import pytest

from conftest import REPO
from launcher.config import Config, load_config, to_yaml

SHIPPED = sorted((REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_config_loads_and_says_how_to_run_it(path: Path):
    config = load_config(path)
    assert isinstance(config, Config)
    comment = path.read_text().splitlines()[:6]
    assert any("launcher train" in line or "accelerate launch" in line for line in comment if line.startswith("#"))


def test_overrides_are_parsed_as_yaml_values(tmp_path: Path):
    config = load_config(REPO / "configs" / "default.yaml", [
        "train.max_steps=7", "train.max_grad_norm=null", "train.grad_norm_type=inf", "freeze=[a.*, 're:b']", "model.dropout=0.1"])
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
