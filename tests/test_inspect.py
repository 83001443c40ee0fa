"""`launcher inspect`: every parameter, its shape and whether it trains under the config's freeze patterns."""

from pathlib import Path

from launcher.bare_model import build_bare_model
from launcher.config import load_config

from conftest import REPO, check, run_cli


def test_inspect_lists_what_the_freeze_patterns_freeze():
    overrides = ["freeze=[tok_embed.*, 're:blocks\\.[01]\\.mlp_(in|out)\\.weight']"]
    proc = check(run_cli("inspect", "configs/default.yaml", *overrides))
    listed = {}
    for line in proc.stdout.splitlines()[1:]:
        if not line.strip():
            break
        name, shape, _numel, trains = line.split()
        listed[name] = (shape, trains)
    model, frozen = build_bare_model(load_config(REPO / "configs" / "default.yaml", overrides))
    assert list(listed) == [name for name, _ in model.named_parameters()]
    for name, param in model.named_parameters():
        assert listed[name] == ("x".join(map(str, param.shape)), "frozen" if name in frozen else "yes"), name
    assert {n for n, (_, t) in listed.items() if t == "frozen"} == {
        "tok_embed.weight",
        "blocks.0.mlp_in.weight",
        "blocks.0.mlp_out.weight",
        "blocks.1.mlp_in.weight",
        "blocks.1.mlp_out.weight",
    }
    assert "total" in proc.stdout  # the per-module table follows


def test_inspect_refuses_a_pattern_that_matches_nothing(tmp_path: Path):
    proc = run_cli("inspect", "configs/default.yaml", "freeze=[blocks.9.*]")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "freeze: 'blocks.9.*' matches no parameter" in proc.stderr
