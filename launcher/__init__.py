"""launcher: a training loop that stays exact from one GPU to many nodes."""

__version__ = "0.1.0"
