"""Labelled text from local TSV/CSV/JSONL files or folders, or a hub dataset, as `Examples`
(partitioned by `edge_lam.data.partition`, tokenized by `edge_lam.data.encode`).

A data folder holds `train.*` and `test.*` (or `validation.*`), each .tsv, .csv, .jsonl or
.json, as `../shared/data/agnews` does. Labels may be strings or integers; the server fixes
the label names (sorted) and sends them to devices, so every device maps labels alike.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path


from edge_lam.models.families import family
from edge_lam.config.run_config import ConfigError, RunConfig
from edge_lam.config.sections import DataSection

SUFFIXES = (".tsv", ".csv", ".jsonl", ".json")
TEST_NAMES = ("test", "validation", "valid", "dev")
TEXT_CANDIDATES = ("text", "sentence", "content", "document")
PROMPT_CANDIDATES = ("prompt", "question", "instruction")
RESPONSE_CANDIDATES = ("response", "answer", "output", "completion")
PLAIN_PROMPT = "### Instruction:\n{prompt}\n\n### Response:\n"


def _read_table(path: Path, encoding: str = "utf-8"):
    """One file as a pandas DataFrame (TSV read verbatim: quotes are text, not quoting);
    a file that is not in `encoding`, or has no rows, is refused with its name and line."""
    import pandas as pd

    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ConfigError(f"{path}: unsupported file type; use one of {', '.join(SUFFIXES)}")
    try:
        if suffix in (".tsv", ".csv"):
            frame = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str,
                                keep_default_na=False, encoding=encoding,
                                quoting=csv.QUOTE_NONE if suffix == ".tsv" else
                                csv.QUOTE_MINIMAL)
        else:
            frame = pd.read_json(path, lines=suffix == ".jsonl", dtype=False,
                                 encoding=encoding)
    except UnicodeDecodeError as err:
        raise ConfigError(_encoding_error(path, encoding)) from err
    except pd.errors.EmptyDataError as err:
        raise ConfigError(f"{path} is empty: it needs a header line and rows") from err
    if len(frame) == 0:
        raise ConfigError(f"{path} has a header but no rows: add examples, or point "
                          "data.path elsewhere")
    return frame


def _encoding_error(path: Path, encoding: str) -> str:
    """Where the first byte that is not `encoding` sits: line and column."""
    for number, line in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            line.decode(encoding)
        except UnicodeDecodeError as err:
            return (f"{path}, line {number}, byte {err.start + 1}: 0x{line[err.start]:02x} is "
                    f"not valid {encoding}: save the file as UTF-8, or set data.encoding to "
                    "its encoding (e.g. data.encoding='latin-1')")
    return f"{path} is not valid {encoding}: set data.encoding to its encoding"


def _find_split(folder: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        for suffix in SUFFIXES:
            candidate = folder / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def resolve_data_path(cfg: RunConfig, override: str = "") -> Path | None:
    """The local data path to use, or None to fall back to the hub dataset: when data.path
    is empty, or is the shipped default and that folder is absent. A data.path the user
    set that does not exist is an error naming it (never replaced by the hub's data)."""
    raw = override or cfg.data.path
    if not raw:
        return None
    path = Path(raw).expanduser()
    if path.exists():
        return path.resolve()
    if override:
        return None  # the caller names the device's --node-config data-dir
    if raw != _DEFAULT_PATH:
        _missing(raw, path)
    return None


_DEFAULT_PATH = next(f.default for f in dataclasses.fields(DataSection) if f.name == "path")


def _missing(raw: str, path: Path) -> None:
    where = "" if path.is_absolute() else f" (relative to the working directory {Path.cwd()})"
    raise ConfigError(f"data.path='{raw}' does not exist: {path.resolve()}{where}; give an "
                      "existing folder with train.tsv and test.tsv (or one file), or "
                      "data.path='' to use data.hub-dataset")


@functools.lru_cache(maxsize=8)
def load_split_frames(path: str | None, hub_dataset: str, encoding: str = "utf-8"):
    """{'train': DataFrame, 'test': DataFrame} from a local folder/file or the hub."""
    if path is not None:
        p = Path(path)
        if p.is_file():
            frame = _read_table(p, encoding)
            return {"train": frame, "test": frame}
        train = _find_split(p, ("train",))
        test = _find_split(p, TEST_NAMES)
        if train is None:
            raise ConfigError(
                f"data.path={p} has no train{SUFFIXES[0]} (or .csv/.jsonl): put the training "
                "split there as train.tsv with a header line"
            )
        return {"train": _read_table(train, encoding),
                "test": _read_table(test or train, encoding)}
    if not hub_dataset:
        raise ConfigError("no data: set data.path to a local folder with train.tsv and test.tsv")
    try:
        from datasets import load_dataset

        ds = load_dataset(hub_dataset)
    except Exception as err:  # offline, unknown id, ...: all end the same way for the user
        raise ConfigError(
            f"data.path does not exist and the hub dataset '{hub_dataset}' could not be "
            f"loaded ({err.__class__.__name__}: {str(err)[:200]}). Point data.path at a local "
            "folder holding train.tsv and test.tsv (header line: text<TAB>label), e.g. "
            "--run-config \"data.path='/abs/path/to/agnews'\""
        ) from err
    test_name = next((n for n in TEST_NAMES if n in ds), "train")
    return {"train": ds["train"].to_pandas(), "test": ds[test_name].to_pandas()}


@dataclass(frozen=True)
class Columns:
    text: str = ""
    label: str = ""
    prompt: str = ""
    response: str = ""
    input: str = ""  # appended to the prompt after a blank line when not empty
    group: str = ""  # data.group-column: the groups a non-IID split draws over


def resolve_columns(frame, cfg: RunConfig) -> Columns:
    """Check the configured columns exist; 'auto' text picks a common name."""
    have = list(frame.columns)

    def need(key: str, name: str) -> str:
        if name not in have:
            raise ConfigError(f"{key}='{name}' is not a column of the data; columns are "
                              f"{', '.join(have)}: set {key} to one of them (edge-lam "
                              f"evaluate: --{key.split('.', 1)[1]})")
        return name

    def pick(key: str, name: str, candidates: tuple[str, ...]) -> str:
        if name == "auto":
            name = next((c for c in candidates if c in have), "")
            if not name:
                raise ConfigError(f"{key}='auto' found none of {candidates} among the columns "
                                  f"{', '.join(have)}: set {key} (edge-lam evaluate: "
                                  f"--{key.split('.', 1)[1]})")
        return need(key, name)

    group = need("data.group-column", cfg.data.group_column) if cfg.data.group_column else ""
    if not family(cfg).labelled:
        extra = cfg.data.input_column
        extra = ("input" if "input" in have else "") if extra == "auto" else \
            ("" if extra == "none" else need("data.input-column", extra))
        return Columns(prompt=pick("data.prompt-column", cfg.data.prompt_column,
                                   PROMPT_CANDIDATES),
                       response=pick("data.response-column", cfg.data.response_column,
                                     RESPONSE_CANDIDATES), input=extra, group=group)
    return Columns(text=pick("data.text-column", cfg.data.text_column, TEXT_CANDIDATES),
                   label=need("data.label-column", cfg.data.label_column), group=group)


def label_names_of(frames: dict, columns: Columns) -> tuple[str, ...]:
    """Sorted label names over both splits (numerically when all labels are integers)."""
    if not columns.label:
        return ()
    values = {str(v) for f in frames.values() for v in f[columns.label]}
    if all(v.lstrip("-").isdigit() for v in values):
        return tuple(sorted(values, key=int))
    return tuple(sorted(values))


@dataclass
class Examples:
    """A split as python lists: texts (or prompt/response pairs) and label ids."""

    texts: list[str]
    labels: list[int]  # empty for causal-lm
    responses: list[str]  # empty for seq-cls
    label_names: tuple[str, ...] = ()  # what the label ids stand for
    groups: list[str] = dataclasses.field(default_factory=list)  # data.group-column's values

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx) -> Examples:
        idx = list(idx)
        return Examples([self.texts[i] for i in idx],
                        [self.labels[i] for i in idx] if self.labels else [],
                        [self.responses[i] for i in idx] if self.responses else [],
                        self.label_names,
                        [self.groups[i] for i in idx] if self.groups else [])


def to_examples(frame, columns: Columns, label_names: tuple[str, ...]) -> Examples:
    groups = frame[columns.group].astype(str).tolist() if columns.group else []
    if columns.prompt:
        prompts = frame[columns.prompt].astype(str).tolist()
        if columns.input:
            prompts = [f"{p}\n\n{x}" if x.strip() else p
                       for p, x in zip(prompts, frame[columns.input].astype(str).tolist())]
        return Examples(prompts, [], frame[columns.response].astype(str).tolist(),
                        groups=groups)
    index = {name: i for i, name in enumerate(label_names)}
    raw = [str(v) for v in frame[columns.label]]
    unknown = sorted(set(raw) - set(index))
    if unknown:
        raise ConfigError(f"labels {unknown[:5]} are not in the federation's label set "
                          f"{list(label_names)}: every device must use the same label names")
    return Examples(frame[columns.text].astype(str).tolist(), [index[v] for v in raw], [],
                    tuple(label_names), groups)


# ---------------------------------------------------------------------------- batching
