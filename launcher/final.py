"""final/: what a finished run leaves in output_dir, for each kind of run, and when it is complete.

- The built-in GPT (or a model.factory module): `model.safetensors`, the bare model's weights.
- A Hugging Face model (model.pretrained, model.hf_config): a folder from_pretrained loads: `config.json`, the weights
  as `model.safetensors` or, above export.max_shard_size, `model-0000k-of-0000n.safetensors` shards and their index
  `model.safetensors.index.json`; the generation config and the tokenizer's files.
- LoRA: the adapter (`adapter_config.json`, `adapter_model.safetensors`) and the tokenizer's files; with
  export.merge_lora also `merged/`, a Hugging Face model folder as above.
- Every kind: `config.yaml`, the run's resolved config. It is the completion marker: removed before final/ is
  (re)written and written last, whole or not at all, so a final/ holding it and every file its run's layout names is
  complete, and one cut short by a crash or a full disk is not.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import yaml

from launcher.config import Config, to_yaml

FINAL = "final"
MARKER = "config.yaml"
WEIGHTS = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
ADAPTER = ("adapter_config.json", "adapter_model.safetensors")


def final_dir(output_dir: Path) -> Path:
    return output_dir / FINAL


def write_final(directory: Path, cfg: Config, write: Callable[[Path], object]) -> None:
    """Main process: `write(directory)` writes the weights (and whatever else the kind of run keeps), then the marker."""
    (directory / MARKER).unlink(missing_ok=True)  # a final/ being rewritten is incomplete until the marker is back
    write(directory)
    temporary = directory / f".{MARKER}.tmp"
    try:  # whole or not at all: a full disk halfway leaves no marker
        temporary.write_text(to_yaml(cfg))
        temporary.replace(directory / MARKER)
    finally:
        temporary.unlink(missing_ok=True)


def finished_config(output_dir: Path) -> dict | None:
    """The config (as saved) of the run whose final/ in output_dir is complete; None when final/ is absent or
    incomplete (no marker, a marker that does not parse, or a file of its layout missing)."""
    directory = final_dir(output_dir)
    try:
        saved = yaml.safe_load((directory / MARKER).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if not isinstance(saved, dict) or missing_files(directory, saved):
        return None
    return saved


def missing_files(directory: Path, saved: dict) -> list[str]:
    """The files final/'s layout names, for the run of the saved config `saved`, that `directory` lacks."""
    model = saved.get("model") if isinstance(saved.get("model"), dict) else {}
    if saved.get("lora") is not None:
        missing = [name for name in ADAPTER if not (directory / name).is_file()]
        if (saved.get("export") or {}).get("merge_lora"):
            missing += [f"merged/{name}" for name in _hf_folder_missing(directory / "merged")]
        return missing
    if model.get("pretrained") is not None or model.get("hf_config") is not None:
        return _hf_folder_missing(directory)
    return _weights_missing(directory)  # a factory's model may be a Hugging Face one, exported as such


def _hf_folder_missing(directory: Path) -> list[str]:
    return ([] if (directory / "config.json").is_file() else ["config.json"]) + _weights_missing(directory)


def _weights_missing(directory: Path) -> list[str]:
    """model.safetensors, or a shard index and every shard it names."""
    if (directory / WEIGHTS).is_file():
        return []
    try:
        shards = sorted(set(json.loads((directory / SHARD_INDEX).read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return [WEIGHTS]
    return [name for name in shards if not (directory / name).is_file()]


def describe(cfg: Config) -> str:
    """final/ in the words of the run's reports."""
    if cfg.lora is not None:
        merged = ", and merged/, the merged model" if cfg.export.merge_lora else ""
        return f"{FINAL}/ (the LoRA adapter, {ADAPTER[1]}{merged})"
    if cfg.model.is_hf:
        return f"{FINAL}/ (a Hugging Face model folder)"
    return f"{FINAL}/{WEIGHTS}"
