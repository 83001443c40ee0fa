"""In a fresh process: `launcher train CONFIG` as the CLI runs it (the pre-flight builds the model on the meta device
first, where the libraries are first imported), then the model's initial weights as the run builds them, saved.

Usage: initial_weights.py CONFIG WEIGHTS_PT [key=value ...]; exits with the run's exit code. The run's
stderr is what comes before the line MARK.
"""

import sys

import torch

from launcher.bare_model import build_bare_model
from launcher.cli import main
from launcher.config import load_config

MARK = "initial_weights: the run ended; building the model again"
config_path, weights_path, *overrides = sys.argv[1:]
code = main(["train", config_path, *overrides])
print(MARK, file=sys.stderr, flush=True)  # what follows on stderr is this build's, not the run's
model, _ = build_bare_model(load_config(config_path, overrides))
torch.save({name: t.detach().clone() for name, t in model.state_dict().items()}, weights_path)
sys.exit(code)
