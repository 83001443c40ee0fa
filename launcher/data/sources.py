"""Where the rows come from: a file, a folder or glob of files, a `save_to_disk` folder, or `load_dataset(name)`.

Every source is checked before anything is tokenized: the columns the format needs exist, and every
row's fields are of the right type (named by row, or by line for JSON lines). A bad source is one
line naming the key, the file and the fix.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from pathlib import Path

import datasets
from datasets.fingerprint import Hasher

from launcher.config import DATA_SUFFIXES, DataConfig
from launcher.data.identity import files_identity
from launcher.data.messages import MessageMap
from launcher.data.tokens import open_tokens, shard_files
from launcher.errors import UsageError

BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def cache_root(cfg: DataConfig) -> Path:
    return cfg.cache_dir or Path(os.environ.get("LAUNCHER_CACHE", Path.home() / ".cache" / "launcher"))


def builtin_corpus_file(cache_dir: Path) -> Path:
    """The CPython documentation topics shipped with Python (pydoc_data) as JSON lines, written once."""
    import pydoc_data.topics

    path = cache_dir / f"pydoc-topics-py{sys.version_info.major}.{sys.version_info.minor}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"title": k, "text": v}) for k, v in sorted(pydoc_data.topics.topics.items())]
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(path)  # atomic: ranks racing here all see a complete file
    return path


FORMAT_FIELDS = {  # per format: canonical column -> the config key naming the source column
    "text": {"text": "text_field"},
    "prompt_completion": {"prompt": "prompt_field", "completion": "completion_field"},
    "chat": {"messages": "messages_field"},
}


def load_documents(cfg: DataConfig, evaluation: bool = False) -> datasets.Dataset:
    """The training rows (or, with `evaluation`, those of data.eval_path / data.eval_split), checked, with
    the format's columns under their canonical names: `text`; `prompt`, `completion`; or `messages`."""
    if cfg.format == "tokens":  # token shards: their headers and sizes checked (the vocabulary: when the tokenizer is known)
        key = "data.eval_path" if evaluation and cfg.eval_path is not None else "data.path"
        return open_tokens((cfg.eval_path or cfg.path) if evaluation else cfg.path, key, cfg.seq_len + 1, 0, 1 << 32)
    datasets.disable_progress_bars()  # bars would be noise in the log, and around a one-line error
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its own error log of a bad file would be a second line
    try:
        if cfg.name is not None and not (evaluation and cfg.eval_path is not None):
            key, where = "data.name", cfg.name
            docs = load_named(cfg, cfg.eval_split if evaluation else cfg.split)
            files = []
        else:
            path = (cfg.eval_path or cfg.path) if evaluation else cfg.path
            path = path or builtin_corpus_file(cache_root(cfg))
            key = "data.eval_path" if evaluation and cfg.eval_path is not None else "data.path"
            where = str(path)
            split_key = "data.eval_split" if evaluation and cfg.eval_path is None else "data.split"
            docs, files = load_path(path, key, (split_key, getattr(cfg, split_key.removeprefix("data."))), cfg)
    finally:
        datasets.logging.set_verbosity(verbosity)
    columns = {}
    for canonical, field_key in FORMAT_FIELDS[cfg.format].items():
        field = "text" if files and files[0].suffix == ".txt" and canonical == "text" else getattr(cfg, field_key)
        if field not in docs.column_names:
            if cfg.format == "text" and (chat := next((c for c in ("messages", "conversations") if c in docs.column_names), None)):
                raise UsageError(
                    f"data.format: '{where}' has no column '{field}' but a '{chat}' column of conversations; set data.format: chat"
                    + ("" if chat == "messages" else f" and data.messages_field: {chat}")
                )
            raise UsageError(
                f"data.{field_key}: '{where}' has no column '{field}' (columns: {', '.join(docs.column_names)});"
                f" set data.{field_key} to the column that holds it"
            )
        marker = checked_marker(cfg, docs, canonical, field)
        if marker is None or not marker.is_file():  # the check reads every row: once per source (and chat mapping)
            if canonical == "messages":
                check_messages(docs, field, key, where, cfg)
            else:
                check_text_column(docs, field, key, where, files, field_key)
            if marker is not None:
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.touch()
        columns[field] = canonical
    docs = docs.select_columns(list(columns))
    return docs.rename_columns({f: c for f, c in columns.items() if f != c}) if any(f != c for f, c in columns.items()) else docs


def checked_marker(cfg: DataConfig, docs: datasets.Dataset, canonical: str, field: str) -> Path | None:
    """The file that records that every row of `field` of these documents passed the checks, so a start reads no row:
    keyed by the documents' fingerprint (from their files' identity for data.path; identity.py), and for chat by the
    mapping of its messages. None in memory."""
    if not docs.cache_files or docs._indices is not None:
        return None
    mapping = ""
    if canonical == "messages":  # the chat mapping decides what a valid row is
        mapping = "-" + Hasher.hash([cfg.message_fields, cfg.roles, cfg.train_field])
    return cache_root(cfg) / "checked" / f"{docs._fingerprint}-{canonical}-{field}{mapping}"


def load_named(cfg: DataConfig, split: str) -> datasets.Dataset:
    """`datasets.load_dataset(name, config, split=...)`: a hub dataset, or a local folder of data files."""
    try:
        return datasets.load_dataset(cfg.name, cfg.config, split=split, cache_dir=str(cfg.cache_dir) if cfg.cache_dir else None)
    except Exception as err:  # the datasets library raises many types for a name it cannot resolve
        raise UsageError(
            f"data.name: cannot load '{cfg.name}'{f' ({cfg.config})' if cfg.config else ''} split '{split}'"
            f" ({type(err).__name__}: {first_line(err)}); check the name, data.config and data.split"
        ) from None


def first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else ""


def load_path(path: Path, key: str, split: tuple[str, str], cfg: DataConfig) -> tuple[datasets.Dataset, list[Path]]:
    """A data file, a folder or glob of data files of one format, or a save_to_disk folder; and the files read.
    `split`: the key and value of the split a DatasetDict folder gives."""
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        return load_saved(path, key, split), []
    if split[0] == "data.eval_split":  # the training files themselves would be evaluated
        raise UsageError(
            f"data.eval_split: '{path}' has no splits (only data.name and a DatasetDict save_to_disk folder have);"
            " give the evaluation data as data.eval_path"
        )
    files = source_files(path)
    if path.suffix == ".bin":
        raise UsageError(f"{key}: '{path}' is a token shard; set data.format: tokens to read it")
    suffixes = sorted({p.suffix for p in files})
    if not files:
        raise UsageError(f"{key}: '{path}' holds no {'/'.join(DATA_SUFFIXES)} file; point it at data files or a save_to_disk folder")
    if len(suffixes) > 1:
        raise UsageError(f"{key}: '{path}' mixes {', '.join(suffixes)} files; use files of one format (e.g. a glob such as *.jsonl)")
    for file in files:
        check_not_empty(file, key)
    builder = BUILDERS[suffixes[0]]
    kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
    # datasets keys its copy of the files by their modification times alone: named by their identity (size and
    # content, identity.py), a file rewritten with the same time gets a copy of its new bytes, and new cache keys
    name = "launcher-" + files_identity(files)["digest"][:16]
    try:
        docs = datasets.load_dataset(
            builder, name=name, data_files=[str(f) for f in files], split="train", cache_dir=str(cfg.cache_dir) if cfg.cache_dir else None, **kwargs
        )
    except Exception as err:  # the datasets library raises many types for an unreadable file
        for file in files:
            if bad := first_bad_bytes(file) or (file.suffix == ".jsonl" and first_bad_json_row(file, None)):
                raise UsageError(f"{key}: '{file}' {bad}") from None
        raise UsageError(f"{key}: cannot read '{path}' as {builder} ({type(err).__name__}: {first_line(err)}); fix the file") from None
    return docs, files


def source_files(path: Path) -> list[Path]:
    """The files a data.path source reads: a save_to_disk folder's files, the data files of a folder or glob, or the file."""
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        return sorted(p for p in path.rglob("*") if p.is_file())
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES)
    if path.is_file():
        return [path]
    return sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())


def data_identity(cfg: DataConfig) -> dict[str, dict]:
    """What identifies the data read from files (data.path, data.eval_path; identity.py), recorded in checkpoints:
    a resume on other bytes is refused. data.name is identified by datasets (a hub revision)."""
    sources = {"data.path": cfg.path if cfg.name is None else None, "data.eval_path": cfg.eval_path}
    sources.update({f"data.sources.{i}.path": source.path for i, source in enumerate(cfg.sources or ())})  # a mixture's weights: config.yaml
    if cfg.format == "tokens":  # a shard is its .bin and its .idx
        listed = {key: (f for b in shard_files(path, key) for f in (b, b.with_suffix(".idx"))) for key, path in sources.items() if path is not None}
        return {key: files_identity([f for f in files if f.is_file()]) for key, files in listed.items()}
    return {key: identity for key, path in sources.items() if path is not None and (identity := files_identity(source_files(path)))}


def data_path(cfg: DataConfig, key: str) -> Path | None:
    """The path a data_identity key names: data.path, data.eval_path or data.sources.N.path."""
    if key.startswith("data.sources."):
        return cfg.sources[int(key.split(".")[2])].path if cfg.sources and int(key.split(".")[2]) < len(cfg.sources) else None
    return getattr(cfg, key.removeprefix("data."))


def load_saved(path: Path, key: str, split: tuple[str, str]) -> datasets.Dataset:
    """A Dataset or DatasetDict folder written by save_to_disk; a DatasetDict gives the split (data.split or data.eval_split)."""
    which, split = split
    try:
        saved = datasets.load_from_disk(str(path))
    except Exception as err:
        raise UsageError(
            f"{key}: cannot read the save_to_disk folder '{path}' ({type(err).__name__}: {first_line(err)}); write it again with save_to_disk"
        ) from None
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise UsageError(f"{which}: '{path}' has no split '{split}' (splits: {', '.join(saved)}); set {which} to one of them")
        saved = saved[split]
    elif which == "data.eval_split":
        raise UsageError(f"data.eval_split: '{path}' is a single Dataset with no splits; give the evaluation data as data.eval_path")
    # the fingerprint (the key of the tokenized cache) comes from state.json: arrow files rewritten beside an
    # unchanged state.json would be tokenized from the old cache; keyed by the files' identity too, they are not
    saved._fingerprint = Hasher.hash((saved._fingerprint, files_identity(source_files(path))["digest"]))
    return saved


def saved_eval_split(cfg: DataConfig) -> str | None:
    """The split of a DatasetDict data.path folder that evaluates when no evaluation set is chosen (data.eval_path,
    data.eval_split, a data.eval_fraction other than the default): its 'test' split, else its 'validation' split."""
    if cfg.name is not None or cfg.path is None or cfg.eval_path is not None or cfg.eval_split is not None or cfg.eval_fraction != 0.05:
        return None
    listing = cfg.path / "dataset_dict.json"
    if not (cfg.path.is_dir() and listing.is_file()):
        return None
    try:
        splits = json.loads(listing.read_text())["splits"]
    except (ValueError, KeyError, TypeError):
        return None  # load_saved names the unreadable folder
    return next((split for split in ("test", "validation") if split in splits and split != cfg.split), None)


def check_not_empty(file: Path, key: str) -> None:
    """A file with no text at all would make an empty split much later; say so now, naming the file."""
    with file.open("rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return
    raise UsageError(f"{key}: '{file}' is {'empty' if file.stat().st_size == 0 else 'whitespace only'}; put data in it or remove it")


def first_bad_bytes(file: Path) -> str | None:
    """For a text file the reader failed on: where its first byte that is not UTF-8 is (None if it is all UTF-8)."""
    if file.suffix == ".parquet":
        return None
    import codecs

    decoder, line, offset = codecs.getincrementaldecoder("utf-8")(), 1, 0
    with file.open("rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                line += chunk[: err.start].count(b"\n")
                return (
                    f"is not UTF-8: byte 0x{chunk[err.start]:02x} at line {line} (byte offset {offset + err.start});"
                    " convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                )
            line, offset = line + chunk.count(b"\n"), offset + len(chunk)
    return None


def check_text_column(
    docs: datasets.Dataset, field: str, key: str = "data.path", where: str = "", files: list[Path] = (), field_key: str = "text_field"
) -> None:
    """Every row's `field` is a string: name the first row that is null, missing or of another type."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = docs.data.table.column(field)
    if docs._indices is None and (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        try:
            column.validate(full=True)  # the text reader passes bytes through: a string that is not UTF-8 stops here
        except pa.ArrowInvalid:
            for file in files:
                if bad := first_bad_bytes(file):
                    raise UsageError(f"{key}: '{file}' {bad}") from None
            raise UsageError(f"{key}: '{where}' has text in '{field}' that is not UTF-8; convert it to UTF-8") from None
        if column.null_count == 0:
            return
        row = pc.index(pc.is_null(column), True).as_py()
        raise UsageError(f"{key}: row {row + 1} of '{where}' has no '{field}' (null or missing); give every row a {field} or remove that row")
    for file in files:  # the file says what a mixed column became
        if file.suffix == ".jsonl" and (bad := first_bad_json_row(file, field, field_key)):
            raise UsageError(f"{key}: '{file}' {bad}")
    values = docs[field]
    row, value = next(((i, v) for i, v in enumerate(values) if not isinstance(v, str)), (None, None))
    if row is None:
        return
    if value is None:
        raise UsageError(f"{key}: row {row + 1} of '{where}' has no '{field}' (null or missing); give every row a {field} or remove that row")
    got = f"{type(value).__name__} {json.dumps(value, default=str)[:40]}"
    raise UsageError(
        f"{key}: row {row + 1} of '{where}': '{field}' is {got}, not text; make it a string (or set data.{field_key} to the column that holds it)"
    )


def check_messages(docs: datasets.Dataset, field: str, key: str, where: str, cfg: DataConfig) -> None:
    """Format chat: every row is a list of messages that map (messages.py) to {role, content} strings with a known
    role, and has at least one assistant turn."""
    mapping = MessageMap(cfg)
    for row, messages in enumerate(docs[field], 1):
        if not isinstance(messages, list) or not messages:
            raise UsageError(
                f"{key}: row {row} of '{where}': '{field}' is {'null' if messages is None else 'not a list of messages'};"
                " give every row a list of {role, content} messages"
            )
        for number, message in enumerate(messages, 1):
            if problem := mapping.problem(number, message):
                name, _, rest = problem.partition(": ")
                raise UsageError(f"{name}: row {row} of '{where}': {rest}")
        if not any(m["role"] == "assistant" for m in mapping.canonical(messages)[0]):
            raise UsageError(f"{key}: row {row} of '{where}' has no assistant turn, so nothing in it would be trained on; add one or remove the row")


def first_bad_json_row(path: Path, field: str | None, field_key: str = "text_field") -> str | None:
    """For a JSON-lines file: the first line that is not a JSON object (or, with `field`, has no string `field`),
    described for the error message (None if every line is fine)."""
    try:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    return f"line {number} is not valid JSON ({err.msg}); fix that line"
                if not isinstance(row, dict):
                    return f'line {number} is not a JSON object; make every line an object such as {{"text": ...}}'
                if field is None:
                    continue
                value = row.get(field)
                if not isinstance(value, str):
                    got = "null or missing" if value is None else f"{type(value).__name__} {json.dumps(value)[:40]}"
                    return f"line {number}: '{field}' is {got}, not text; make it a string (or set data.{field_key})"
    except (OSError, UnicodeDecodeError):
        return None
    return None


def split_documents(docs: datasets.Dataset, eval_fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Hold out whole documents, so no evaluated text was trained on: `DocumentSplit`s, drawn when first read."""
    if eval_fraction == 0:
        return docs, None
    n_eval = max(1, round(eval_fraction * len(docs)))
    if len(docs) - n_eval < 1:
        raise UsageError(
            f"data.eval_fraction: {len(docs)} document(s) cannot be split into train and eval; add documents or set data.eval_fraction=0"
        )
    return DocumentSplit(docs, n_eval, seed, held_out=False), DocumentSplit(docs, n_eval, seed, held_out=True)


class DocumentSplit:
    """The training or the held-out documents of a source, as a Dataset once read (any attribute but those below).
    Until then only its fingerprint (from the source's, the number held out and the seed) and the source's cache files
    are known, which is all a start needs whose rows are cached (packing.cached_rows): it draws no permutation of the
    documents, 8 bytes each in memory (seconds and gigabytes per rank at hundreds of GB of text). Read, the split is
    the permutation of Dataset.train_test_split(seed=seed), its indices in memory, so nothing is written beside the
    source (a save_to_disk folder stays as it was)."""

    def __init__(self, docs: datasets.Dataset, n_eval: int, seed: int, held_out: bool):
        self._source, self._n_eval, self._seed, self._held_out = docs, n_eval, seed, held_out
        self._fingerprint = Hasher.hash((docs._fingerprint, "documents held out", n_eval, seed, held_out))
        self.cache_files = docs.cache_files
        self._documents: datasets.Dataset | None = None

    def __len__(self) -> int:
        return self._n_eval if self._held_out else len(self._source) - self._n_eval

    @property
    def documents(self) -> datasets.Dataset:
        if self._documents is None:
            import numpy as np

            order = np.random.default_rng(self._seed).permutation(len(self._source))
            mine = order[: self._n_eval] if self._held_out else order[self._n_eval :]
            self._documents = self._source.select(mine, keep_in_memory=True, new_fingerprint=self._fingerprint)
        return self._documents

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("_source", "_documents"):  # a copy or pickle probing a half-made object
            raise AttributeError(name)
        return getattr(self.documents, name)

    def __getitem__(self, key):
        return self.documents[key]

    def __iter__(self):
        return iter(self.documents)
