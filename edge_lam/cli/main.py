r"""`edge-lam` command line: evaluate or prompt a saved adapter (or a base model, zero-shot);
check a run config before `flwr run`, or `run` (check, `flwr run --stream`, exit with the
run's status); stop the local SuperLink; print the run-config keys.

examples:
  edge-lam evaluate --adapter results/<run-id>/adapter --data ../shared/data/agnews
  edge-lam evaluate --adapter results/<run-id>/adapter --data test.tsv --rank 2 --json
  edge-lam evaluate --model smollm2-135m-instruct --task lm-cls \
      --data ../shared/data/agnews --set "data.template=Topic of: {text} Answer:"
  edge-lam generate --adapter results/<run-id>/adapter --prompt "What is 12 * 7?"
  edge-lam config --check recipes/quickstart.toml     # before: flwr run . --run-config ...
  edge-lam run . --run-config recipes/quickstart.toml # checked, streamed, exits with its status
  edge-lam config --check "lora.alpha=32 train.lr=0.002"
  edge-lam superlink status                           # the SuperLink `flwr run .` started
  edge-lam superlink stop
  edge-lam config --markdown                          # the key tables of the docs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from peft import TaskType

from edge_lam.config.run_config import ConfigError, RunConfig
from edge_lam.models.families import family
from edge_lam.training.evaluation import load_adapter


def evaluate_adapter(adapter: Path, data: Path, rank: int | None = None,
                     batch_size: int | None = None, columns: dict | None = None,
                     progress: bool = False) -> dict:
    """Accuracy and loss of a saved adapter (or its rank-`rank` truncation) on `data`."""
    from edge_lam.training.evaluation import truncated
    from edge_lam.data.text import load_split_frames, resolve_columns, to_examples
    from edge_lam.training.lora import lora_rank
    from edge_lam.models.lora_model import (get_lora_model, load_tokenizer, resolve_model_source,
                                            set_trainable_state)
    from edge_lam.training.loop import evaluate

    cfg, labels, state = load_adapter(adapter)
    if batch_size:
        cfg = cfg.updated("eval", batch_size=batch_size)
    if columns:  # --text-column / --label-column / ...: this data's own column names
        cfg = cfg.updated("data", **columns)
    if not data.exists():
        raise ConfigError(f"--data {data} does not exist: give a .tsv/.csv/.jsonl file or a "
                          "folder with test.tsv")
    full_rank = lora_rank(state)
    if rank is not None and rank < 1:
        raise ConfigError(f"--rank {rank} must be at least 1 (leave it out for the adapter's "
                          f"full rank, {full_rank})")
    rank = full_rank if rank is None else rank
    state = truncated(state, rank)
    frame = load_split_frames(str(data.resolve()), "", cfg.data.encoding)["test"]
    examples = to_examples(frame, resolve_columns(frame, cfg), labels)
    model = get_lora_model(cfg, labels, rank)
    set_trainable_state(model, state)
    metrics = evaluate(model, load_tokenizer(resolve_model_source(cfg.model)), examples, cfg,
                       progress)
    return {**metrics, "rank": rank, "adapter_rank": full_rank, "adapter": str(adapter),
            "data": str(data)}


def base_config(model: str, task: str, sets: list[str]) -> RunConfig:
    """A run config for a base model alone (`--set key=value` as in `flwr run`)."""
    from edge_lam.config.options import parse_value

    from edge_lam.models.families import FAMILIES

    if task not in FAMILIES:
        raise ConfigError(f"--task {task} is not known: use one of {', '.join(FAMILIES)}")
    raw = {"model": model, "task": task, "strategy": "fedavg", "lora.fedavg-rank": 1,
           "eval.max-examples": 0}  # a zero LoRA update on the family's usual layers
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r} must look like key=value")
        raw[key] = parse_value(value)
    return RunConfig.from_run_config(raw)


def load_model(adapter: Path | None, model: str | None, task: str, sets: list[str]):
    """(config, label names, PEFT model): a saved adapter's, or the base model with a zero
    LoRA update (exactly the base model's outputs)."""
    from edge_lam.training.lora import lora_rank
    from edge_lam.models.lora_model import get_lora_model, initial_lora_state, set_trainable_state

    if (adapter is None) == (model is None):
        raise ConfigError("give exactly one of --adapter (a saved adapter) or --model (a base "
                          "model, zero-shot)")
    if adapter is not None:
        cfg, labels, state = load_adapter(adapter)
    else:
        cfg, labels = base_config(model, task, sets), ()
        if family(cfg).labelled:
            raise ConfigError("a base model alone has no labels to score: evaluate it with "
                              "--data (classification), or use a causal LM task")
        state = initial_lora_state(cfg, labels, 1)
    net = get_lora_model(cfg, labels, lora_rank(state))
    set_trainable_state(net, state)
    return cfg, labels, net


def evaluate_model(model: str, task: str, data: Path, sets: list[str],
                   progress: bool = False) -> dict:
    """Zero-shot accuracy and loss of a base model on `data`'s test split."""
    from edge_lam.training.evaluation import ServerModel
    from edge_lam.models.lora_model import initial_lora_state

    if not data.exists():
        raise ConfigError(f"--data {data} does not exist: give a .tsv/.csv/.jsonl file or a "
                          "folder with test.tsv")
    cfg = base_config(model, task, [f"data.path={data}", *sets])
    server = ServerModel.prepare(cfg)  # B = 0: the LoRA update is zero, the base model speaks
    return {**server.evaluate(initial_lora_state(cfg, server.label_names, 1), progress),
            "rank": 0,
            "model": model, "data": str(data)}


def generate(cfg: RunConfig, net, prompt: str, max_new_tokens: int, raw: bool) -> str:
    """Greedy answer to `prompt`, posed as in training (`data.format`: the chat template when
    the model has one), or as it is with `raw`."""
    from edge_lam.serving.generation import answers
    from edge_lam.models.lora_model import load_tokenizer, resolve_model_source

    if family(cfg).peft_task != TaskType.CAUSAL_LM:
        raise ConfigError(f"task='{cfg.task}' has a classification head: generate needs a "
                          "causal LM (task='causal-lm' or 'lm-cls')")
    if raw:
        cfg = cfg.updated("data", format="raw")
    tokenizer = load_tokenizer(resolve_model_source(cfg.model))
    return answers(net, tokenizer, cfg, [prompt], max_new_tokens)[0]


def config_rows() -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(section title, [(key, default, meaning)]) for every section, core then plug-ins."""
    from edge_lam.config.run_config import RunConfig, sections, strategy_names
    from edge_lam.config.options import section_rows

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


def build_parser() -> argparse.ArgumentParser:
    from edge_lam.models.families import FAMILIES

    parser = argparse.ArgumentParser(prog="edge-lam", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("evaluate", help="evaluate a saved adapter (or a base model) on data")
    ev.add_argument("--adapter", type=Path, help="results/<run-id>/adapter")
    ev.add_argument("--model", help="a base model instead (hub id, folder, .gguf, known name)")
    ev.add_argument("--task", default="causal-lm", choices=tuple(FAMILIES),
                    help="with --model: the model family (default: %(default)s)")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="with --model: run-config keys (data columns, template, ...)")
    ev.add_argument("--data", required=True, type=Path,
                    help="a .tsv/.csv/.jsonl file, or a folder with test.* (else validation.*)")
    ev.add_argument("--rank", type=int, default=None,
                    help="evaluate the truncation a device of this rank would receive")
    ev.add_argument("--batch-size", type=int, default=None, metavar="N",
                    help="examples per forward pass (default: the adapter's eval.batch-size)")
    for option in ("text-column", "label-column", "prompt-column", "response-column"):
        ev.add_argument(f"--{option}", default=None,
                        help=f"this data's {option.replace('-', ' ')} (default: the adapter's "
                             f"data.{option})")
    ev.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="a progress bar on stderr (default: when stderr is a terminal)")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    gen = sub.add_parser("generate", help="answer a prompt with a saved adapter or a model")
    gen.add_argument("--adapter", type=Path, help="results/<run-id>/adapter")
    gen.add_argument("--model", help="a base model instead (hub id, folder, .gguf, known name)")
    gen.add_argument("--prompt", required=True,
                     help="the question, posed as in training (the chat template, if any)")
    gen.add_argument("--max-new-tokens", type=int, default=128,
                     help="longest answer in tokens (default: %(default)s)")
    gen.add_argument("--raw", action="store_true", help="no chat template")
    conf = sub.add_parser("config", help="the run-config keys, their defaults and meaning; "
                          "--check a --run-config before `flwr run`")
    conf.add_argument("--markdown", action="store_true", help="as the docs' key tables")
    conf.add_argument("--check", nargs="+", metavar="RUN_CONFIG",
                      help="what `flwr run . --run-config` would get: a recipe .toml or "
                           "key=value pairs; names an unknown key and the closest known one")
    conf.add_argument("--app", type=Path, default=None,
                      help="with --check: the app folder whose pyproject.toml declares the "
                           "keys (default: this installation's)")
    sub.add_parser("run", add_help=False,
                   help="check the run config, `flwr run --stream` the app, print the run's "
                        "final status and exit 0 only if it completed (`edge-lam run --help`)")
    link = sub.add_parser("superlink", help="the local SuperLink that `flwr run .` started "
                          "(of this FLWR_HOME): where its runs write results; stop it")
    link.add_argument("action", choices=("status", "stop"))
    return parser


def check_command(run_config: list[str], app: Path | None) -> int:
    from edge_lam.cli.runcheck import ROOT, check_run_config

    cfg = check_run_config(run_config, app or ROOT)
    print(f"ok: strategy={cfg.strategy} mode={cfg.mode} model={cfg.model} "
          f"num-server-rounds={cfg.num_rounds}")
    return 0


def superlink_command(action: str) -> int:
    from edge_lam.cli import local_superlink

    home = local_superlink.flwr_home()
    if action == "stop":
        print(local_superlink.stop(home))
    else:
        print("\n".join(local_superlink.status_lines(home)))
    return 0


def evaluate_command(args: argparse.Namespace) -> dict:
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    if args.model is not None and args.adapter is None:
        return {**evaluate_model(args.model, args.task, args.data, args.set, progress),
                "adapter_rank": 0}
    if args.adapter is None:
        raise ConfigError("give --adapter (a saved adapter) or --model (a base model)")
    columns = {name: getattr(args, name) for name in ("text_column", "label_column",
                                                       "prompt_column", "response_column")
               if getattr(args, name) is not None}
    return evaluate_adapter(args.adapter, args.data, args.rank, args.batch_size, columns,
                            progress)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:  # its arguments go on to `flwr run`: its own parser
        from edge_lam.cli import run

        return run.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "config":
            if args.check:
                return check_command(args.check, args.app)
            print(config_markdown() if args.markdown else config_text())
            return 0
        if args.command == "superlink":
            return superlink_command(args.action)
        if args.command == "generate":
            cfg, _, net = load_model(args.adapter, args.model, "causal-lm", [])
            print(generate(cfg, net, args.prompt, args.max_new_tokens, args.raw))
            return 0
        result = evaluate_command(args)
    except ConfigError as err:
        print(f"edge-lam: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        extra = "".join(f"  {k} {result[k]:.4f}" for k in ("perplexity", "exact_match")
                        if k in result)
        print(f"accuracy {result['accuracy']:.4f}  loss {result['loss']:.4f}{extra}  "
              f"({result['examples']} examples, rank {result['rank']} of "
              f"{result['adapter_rank']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
