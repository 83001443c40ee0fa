"""`launcher plan` computes what the real run then does, and refuses bad input the same way."""

import re
from pathlib import Path

from conftest import check, run_cli, tiny_config, write_config


def test_plan_numbers_equal_the_real_runs(tmp_path: Path):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, train={"max_steps": None, "epochs": 2}, freeze=["pos_embed.*"]))
    plan = check(run_cli("plan", str(config), "--gpus-per-node", "2", "--time-limit", "00:30:00", "--step-time-s", "2"))
    run = check(run_cli("train", str(config), nproc=2))
    planned = re.search(r"(global batch .*)\n.*\n(\d+) training samples, (\d+) steps per epoch, (\d+) steps", plan.stdout)
    ran = re.search(r"DDP \(gloo\): (global batch [^;]*); (\d+) training samples of \d+ tokens, (\d+) steps per epoch, (\d+) steps", run.stdout)
    assert planned and ran, (plan.stdout, run.stdout)
    assert planned.groups() == ran.groups()
    assert "world size 2 = 1 node(s) x 2 process(es)" in plan.stdout
    table = lambda text: text[text.index("module ") : text.index("total")]  # noqa: E731
    assert table(plan.stdout) == table(run.stdout)
    assert "a 0.50 h allocation (USR1 180 s before its end) runs about 810 steps" in plan.stdout
    assert (f"sbatch --nodes=1 --ntasks-per-node=1 --gpus-per-node=2 --exclusive --mem=0 --time=00:30:00 slurm/train.sbatch {config}") in plan.stdout
    assert "checkpoints: on a stop signal" in plan.stdout and "every 30 min of training inside a SLURM job" in plan.stdout


def test_plan_prints_the_sbatch_line_with_resources(tmp_path: Path):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, checkpoint={"every_minutes": 20}))
    plan = check(
        run_cli(
            "plan", str(config), "output_dir=runs/{array_task_id}", "--nodes", "2", "--gpus-per-node", "4", "--cpus-per-task", "32", "--mem", "200G"
        )
    )
    assert (
        f"sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=4 --cpus-per-task=32 --mem=200G slurm/train.sbatch"
        f" {config} 'output_dir=runs/{{array_task_id}}'"
    ) in plan.stdout  # the placeholder is filled in the job
    assert "OMP_NUM_THREADS = 32 CPUs / 4 processes = 8" in plan.stdout and "every 20 min of training" in plan.stdout


def test_plan_refuses_what_the_run_refuses(tmp_path: Path):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    for overrides in (["freeze=[nothing.*]"], ["train.micro_batch_size=0"], ["data.text_field=body"]):
        plan, train = run_cli("plan", str(config), *overrides), run_cli("train", str(config), *overrides)
        assert plan.returncode == train.returncode == 2
        assert plan.stderr == train.stderr and plan.stderr.count("\n") == 1, (plan.stderr, train.stderr)
