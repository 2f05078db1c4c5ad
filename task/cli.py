"""`edge-lam` command line: evaluate a saved global adapter; print the run-config keys.

    edge-lam evaluate --adapter results/<run-id>/adapter --data ../shared/data/agnews
    edge-lam evaluate --adapter ... --data test.tsv --rank 2 --json
    edge-lam config --markdown      # README's key tables, from the section dataclasses
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors.numpy import load_file

from task.config import ConfigError, RunConfig


def load_adapter(adapter: Path) -> tuple[RunConfig, tuple[str, ...], dict]:
    """(run config it was trained with, label names, state) of a saved edge-lam adapter."""
    meta_path = adapter / "edge_lam.json"
    weights = adapter / "adapter_model.safetensors"
    if not meta_path.is_file() or not weights.is_file():
        raise ConfigError(f"{adapter} is not an edge-lam adapter folder (it needs "
                          "edge_lam.json and adapter_model.safetensors): pass "
                          "results/<run-id>/adapter")
    meta = json.loads(meta_path.read_text())
    return (RunConfig.from_dict(meta["run_config"]), tuple(meta["label_names"]),
            load_file(str(weights)))


def evaluate_adapter(adapter: Path, data: Path, rank: int | None = None,
                     batch_size: int | None = None) -> dict:
    """Accuracy and loss of a saved adapter (or its rank-`rank` truncation) on `data`."""
    from task.evaluation import truncated
    from task.data import load_split_frames, resolve_columns, to_examples
    from task.lora import lora_rank
    from task.model import get_lora_model, load_tokenizer, resolve_model_source, \
        set_trainable_state
    from task.train import evaluate

    cfg, labels, state = load_adapter(adapter)
    if batch_size:
        cfg = cfg.updated("eval", batch_size=batch_size)
    if not data.exists():
        raise ConfigError(f"--data {data} does not exist: give a .tsv/.csv/.jsonl file or a "
                          "folder with test.tsv")
    full_rank = lora_rank(state)
    rank = rank or full_rank
    if rank < 1:
        raise ConfigError(f"--rank {rank} must be at least 1")
    state = truncated(state, rank)
    frame = load_split_frames(str(data.resolve()), "")["test"]
    examples = to_examples(frame, resolve_columns(frame, cfg), labels)
    model = get_lora_model(cfg, labels, rank)
    set_trainable_state(model, state)
    metrics = evaluate(model, load_tokenizer(resolve_model_source(cfg.model)), examples, cfg)
    return {**metrics, "rank": rank, "adapter_rank": full_rank, "adapter": str(adapter),
            "data": str(data)}


def config_rows() -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(section title, [(key, default, meaning)]) for every section, core then plug-ins."""
    from task.config import RunConfig, sections, strategy_names
    from task.options import section_rows

    top = section_rows(RunConfig, "")
    top = [(k, d, f"{m}: {', '.join(f'`{n}`' for n in strategy_names())}"
            if k == "strategy" else m) for k, d, m in top]
    out = [("top level", top)]
    for name, cls in sections().items():
        rows = section_rows(cls, name)
        if name == "devices":
            rows.append(("devices.rank.<profile>", "rpi4=2, rpi5=4, jetson-orin-nano=8, "
                         "laptop=16", "rank of each profile (a new profile: a new line in "
                         "pyproject.toml)"))
        if hasattr(cls, "extra_rows"):
            rows += cls.extra_rows(name)
        out.append((f"`{name}.*`: {(cls.__doc__ or '').strip().splitlines()[0]}", rows))
    return out


def config_markdown() -> str:
    lines = []
    for title, rows in config_rows():
        lines += [f"**{title}**", "", "| key | default | meaning |", "|---|---|---|"]
        lines += [f"| `{k}` | {d if '`' in d else f'`{d}`'} | {m} |" for k, d, m in rows]
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def config_text() -> str:
    return "\n".join(f"{k} = {d}    # {m}" for _, rows in config_rows() for k, d, m in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge-lam", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("evaluate", help="evaluate a saved adapter on labelled data")
    ev.add_argument("--adapter", required=True, type=Path, help="results/<run-id>/adapter")
    ev.add_argument("--data", required=True, type=Path,
                    help="a .tsv/.csv/.jsonl file, or a folder with test.* (else validation.*)")
    ev.add_argument("--rank", type=int, default=None,
                    help="evaluate the truncation a device of this rank would receive")
    ev.add_argument("--batch-size", type=int, default=None)
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    conf = sub.add_parser("config", help="the run-config keys, their defaults and meaning")
    conf.add_argument("--markdown", action="store_true", help="as README's tables")
    args = parser.parse_args(argv)
    if args.command == "config":
        print(config_markdown() if args.markdown else config_text())
        return 0
    try:
        result = evaluate_adapter(args.adapter, args.data, args.rank, args.batch_size)
    except ConfigError as err:
        print(f"edge-lam: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print(f"accuracy {result['accuracy']:.4f}  loss {result['loss']:.4f}  "
              f"({result['examples']} examples, rank {result['rank']} of "
              f"{result['adapter_rank']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
