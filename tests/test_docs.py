"""The docs say what the code does: the CLI reference is generated from the argument parser, every exit code is in the
exit-code table, the first-run guide's commands run as written on a CPU, and the README's links lead somewhere. (The config reference is checked in
test_architecture.py; the example configs in test_examples.py; `mkdocs build --strict` runs in .ci/run.)"""

import re
import shlex
import subprocess

import launcher.exits
from launcher.cli_reference import BEGIN, END, cli_reference

from conftest import PYTHON, REPO, check, cpu_env

DOCS = REPO / "docs"


def test_cli_reference_is_generated_from_the_parser():
    page = (DOCS / "reference" / "cli.md").read_text()
    generated = page[page.index(BEGIN) + len(BEGIN) : page.index(END)].strip("\n") + "\n"
    assert generated == cli_reference().strip("\n") + "\n", (
        "docs/reference/cli.md differs from launcher/cli.py's parser: python -m launcher.cli_reference --write docs/reference/cli.md"
    )


def test_every_exit_code_is_in_the_table():
    codes = {value for name, value in vars(launcher.exits).items() if name.startswith("EXIT_")}
    page = (DOCS / "reference" / "exit-codes.md").read_text()
    rows = {int(code) for code in re.findall(r"^\| (\d+) \|", page, re.M)}
    assert rows == codes


def shell_commands(page: str) -> list[str]:
    """The commands of a guide's ```sh blocks, one per line, without their trailing comments."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", page, re.S):
        for line in block.replace("\\\n", " ").splitlines():  # a line continued with a backslash is one command
            words = shlex.split(line, comments=True)
            if words:
                commands.append(" ".join(words))
    return commands


# the first-run and memory guides' commands, each run here as written, or named with why not (a new command must be placed)
FIRST_RUN_RUNS = [
    "launcher train configs/default.yaml --debug",
    "launcher inspect configs/default.yaml",
    "launcher plan configs/default.yaml --nodes 4 --gpus-per-node 8 --time-limit 24:00:00 --step-time-s 0.2",
    "launcher plot outputs/default-debug",
    "launcher plan configs/default.yaml --compare-backends",  # the memory guide's (its others are the first run's)
]
FIRST_RUN_ELSEWHERE = {
    "scripts/setup && .venv/bin/launcher train configs/default.yaml": "the set-up is the CI's own; the default job, shortened: test_default_job.py",
    "scripts/test": "the CI runs it",
    "launcher train configs/default.yaml --simulate-world-size 32 train.max_steps=20 output_dir=outputs/sim32": "minutes on CPU; test_debug.py",
    "launcher train configs/default.yaml --overfit-batches 1 train.max_steps=300 output_dir=outputs/overfit": "minutes on CPU; test_debug.py",
}


def test_first_run_and_memory_guide_commands_run_as_written(tmp_path):
    commands = shell_commands((DOCS / "guides" / "first-run.md").read_text())
    assert sorted(commands + ["launcher plan configs/default.yaml --compare-backends"]) == sorted(FIRST_RUN_RUNS + list(FIRST_RUN_ELSEWHERE))
    assert set(shell_commands((DOCS / "guides" / "memory.md").read_text())) <= set(FIRST_RUN_RUNS)
    (tmp_path / "configs").symlink_to(REPO / "configs")  # a fresh clone's folder, without the checkout's outputs/
    env = cpu_env(PYTHONPATH=str(REPO))
    results = {}
    for command in FIRST_RUN_RUNS:
        argv = [PYTHON, "-m", "launcher", *shlex.split(command)[1:]]
        results[command] = check(subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300))
    debug = results[FIRST_RUN_RUNS[0]].stdout
    assert "debug summary" in debug and "10 steps on one process (cpu); global batch 16 = micro-batch 8 x accumulation 2 x world size 1" in debug
    assert "every loss and gradient finite, checked after each of 10 steps" in debug
    assert "pos_embed.weight" in results[FIRST_RUN_RUNS[1]].stdout
    assert "world size 32 = 4 node(s) x 8 process(es)" in results[FIRST_RUN_RUNS[2]].stdout
    assert (tmp_path / "outputs" / "default-debug" / "plots" / "loss.png").is_file()
    compared = results[FIRST_RUN_RUNS[4]].stdout
    assert all(re.search(rf"^  {backend} +[\d.]+ [KMG]?B", compared, re.M) for backend in ("DDP", "ZeRO-1", "ZeRO-2", "ZeRO-3", "FSDP2")), compared


def test_readme_links_name_existing_pages():
    """mkdocs checks the links of docs/; the README lies outside it, so its links into docs/ are checked here."""
    readme = (REPO / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    assert len(targets) > 20
    missing = sorted({t for t in targets if not t.startswith("http") and not (REPO / t).exists()})
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_guides_plan_the_examples_as_their_comments_do():
    """A guide's `launcher plan configs/examples/...` line is the example's own `Plan:` line, which test_examples.py runs."""
    plan_lines = {
        line.split("Plan:", 1)[1].strip()
        for path in (REPO / "configs" / "examples").glob("*.yaml")
        for line in path.read_text().splitlines()
        if line.startswith("# Plan:")
    }
    in_guides = [
        c for page in (DOCS / "guides").glob("*.md") for c in shell_commands(page.read_text()) if c.startswith("launcher plan configs/examples/")
    ]
    assert len(in_guides) >= 3
    assert set(in_guides) <= plan_lines, sorted(set(in_guides) - plan_lines)
