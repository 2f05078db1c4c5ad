"""S7 sub-model federated learning of the token embedding, measured.

- `--part bytes`: payload bytes per device per round (down + up) of LoRA only, LoRA + the
  device's own embedding rows (with and without decoys at each `--epsilons`), and LoRA +
  the full table, from each device's real request (`strategies.submodel.device
  .device_request`: its partition of the data, tokenized as training tokenizes it). Needs
  the tokenizer and the model's table size only (CPU, seconds).
- `--part quality`: the real federation (`strategies.submodel.server.federate` driving the
  ClientApp in process) with `submodel.rows` = none (LoRA only), touched (+ decoys), all
  (the full table); the test NLL per response token after the last round, and the
  measured wire bytes per device per round (metrics.jsonl).
- `--part new-vocab`: `--new-tokens` frequent code identifiers added to the tokenizer (rows
  initialised to the mean of their sub-word rows); LoRA only vs LoRA + rows; the NLL of
  the test responses at the positions of the new tokens, read back through a plain
  `PeftModel.from_pretrained` of the saved adapter.
Each part updates its key of `<out>/submodel.json`; `--render` writes submodel.md from it.

    python benchmarks/submodel.py --part bytes --models smollm2-135m-instruct,gemma-3-270m
    python benchmarks/submodel.py --part quality --models /tmp/smol.gguf --domains codealpaca
    python benchmarks/submodel.py --render --out benchmarks/results/submodel
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from benchmarks.common import (machine_line, provenance, read_json, run_inprocess,  # noqa: E402
                               write_json)
from edge_lam.config.run_config import RunConfig  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def base_raw(args, model: str, domain: str, results: Path, **extra) -> dict:
    return {"model": model, "task": "causal-lm", "data.path": str(Path(args.data) / domain),
            "strategy": "submodel", "submodel.aggregation": "fedavg",
            "lora.fedavg-rank": args.rank, "lora.target-modules": "q_proj,v_proj",
            "data.partitioner": "iid", "num-server-rounds": args.rounds,
            "train.local-steps": args.local_steps, "train.batch-size": args.batch,
            "train.max-length": args.max_length, "eval.max-examples": args.eval_max,
            "eval.metric": "nll", "submodel.lr": args.rows_lr, "seed": args.seed,
            "results-dir": str(results), "min-devices": 1, **extra}


def short(model: str) -> str:
    name = Path(model).name.lower()
    return "gemma-3-270m" if "gemma" in name else "smollm2-135m" if "smol" in name else name


# ---------------------------------------------------------------------------- bytes
def part_bytes(args) -> list[dict]:
    from strategies.submodel.device import device_request
    from strategies.submodel.math import decoy_rate, row_bytes, secure_row_bytes
    from strategies.submodel.rows import base_table
    from edge_lam.training.device import DeviceInfo
    from edge_lam.training.lora import state_nbytes
    from edge_lam.models.lora_model import get_lora_model, initial_lora_state

    out = []
    for model in args.models.split(","):
        for domain, devices in [(d, n) for d in args.domains.split(",")
                                for n in args.bytes_devices]:
            args.devices = devices
            raw = base_raw(args, model, domain, Path(tempfile.mkdtemp()))
            cfg = RunConfig.from_run_config(raw)
            vocab, dim = base_table(get_lora_model(cfg, (), args.rank)).shape
            adapter = state_nbytes(initial_lora_state(cfg, (), args.rank))
            full = adapter + vocab * dim * 4
            def requests(c):
                return [device_request(c, DeviceInfo(partition_id=p, num_partitions=devices),
                                       (), vocab, p)["ids"] for p in range(devices)]

            own = requests(cfg)
            rows = [int(r.size) for r in own]
            cases = [("lora only", [np.zeros(0)], False),
                     ("lora + own rows, plain", own, False),
                     ("lora + own rows, secure", own, True)]
            for eps in args.epsilons:
                cases.append((f"lora + rows, decoys eps={eps:g} (q={decoy_rate(eps):.4f}), "
                              "secure", requests(cfg.updated("submodel", decoys=True,
                                                             epsilon=eps)), True))
            for name, reqs, secure in cases:
                m_int = int(round(np.mean([r.size for r in reqs])))
                # secure: every device of the round (here all `devices`) gets U's ids and
                # uploads |U| x (d + 1) uint64; plain: ids + values (+ counts up)
                union = int(np.unique(np.concatenate(reqs)).size) if secure else None
                down = adapter + row_bytes(m_int, dim) + (8 * union if secure else 0)
                up = adapter + (secure_row_bytes(union, dim) if secure else
                                row_bytes(m_int, dim, counts=True) if m_int else 0)
                out.append({"model": short(model), "domain": domain, "devices": devices,
                            "case": name, "rows": m_int, "union": union,
                            "down": down, "up": up, "total": down + up,
                            "vs_full": (down + up) / (2 * full)})
            out.append({"model": short(model), "domain": domain, "devices": devices,
                        "case": "lora + full table", "rows": vocab, "union": None,
                        "down": full, "up": full, "total": 2 * full, "vs_full": 1.0})
            print(f"{short(model)} {domain} {devices} devices: {vocab} x {dim}, own rows per device "
                  f"{np.mean(rows):.0f} (min {min(rows)}, max {max(rows)})", flush=True)
    return out


# ---------------------------------------------------------------------------- quality
SERVER = "strategies.submodel.server"  # its prepare_run / federate


def summarise(rows: list[dict], setup: str, started: float) -> dict:
    clients = [c for r in rows for c in r.get("clients", [])]
    return {"setup": setup, "initial_nll": rows[0]["loss"], "final_nll": rows[-1]["loss"],
            "curve": [r["loss"] for r in rows],
            "bytes_down": float(np.mean([c["bytes_down"] for c in clients])),
            "bytes_up": float(np.mean([c["bytes_up"] for c in clients])),
            "rows_requested": float(np.mean([c.get("rows_requested", 0) for c in clients])),
            # secure aggregation: a device's own rows are not in its (masked) uplink
            "rows_counted": float(np.mean([c.get("rows_counted") or 0 for c in clients])),
            "wall_s": time.perf_counter() - started}


SETUPS = {"lora only": {"submodel.rows": "none"},
          "lora + own rows": {"submodel.rows": "touched"},
          "lora + own rows, plain": {"submodel.rows": "touched", "submodel.secure": False},
          "lora + rows + decoys eps=3": {"submodel.rows": "touched", "submodel.decoys": True,
                                        "submodel.epsilon": 3.0},
          "lora + full table": {"submodel.rows": "all"}}


def part_quality(args, work: Path) -> list[dict]:
    out, run_id = [], 0
    for model in args.models.split(","):
        for domain in args.domains.split(","):
            for setup in args.setups.split(","):
                run_id += 1
                t0 = time.perf_counter()
                raw = base_raw(args, model, domain, work, **SETUPS[setup])
                rows, _ = run_inprocess(raw, args.devices, run_id, SERVER)
                res = {"model": short(model), "domain": domain, "rows_lr": args.rows_lr,
                       **summarise(rows, setup, t0)}
                print(json.dumps(res), flush=True)
                out.append(res)
    return out


# ---------------------------------------------------------------------------- new vocab
def frequent_identifiers(tokenizer, texts: list[str], k: int) -> list[str]:
    """The k most frequent code identifiers (>= 6 characters, >= 3 sub-word tokens)."""
    words = Counter(w for t in texts for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]{5,}", t))
    out = []
    for word, _ in words.most_common():
        if len(tokenizer(word, add_special_tokens=False)["input_ids"]) >= 3:
            out.append(word)
        if len(out) == k:
            break
    return out


def extended_model(model: str, domain_dir: Path, k: int, folder: Path) -> list[int]:
    """Save `model` with k new tokens (rows: mean of their sub-word rows) to `folder`."""
    import torch
    from transformers import AutoModelForCausalLM

    from edge_lam.data.text import load_split_frames
    from edge_lam.models.lora_model import load_tokenizer, resolve_model_source

    source = resolve_model_source(model)
    tok = load_tokenizer(source)
    train = load_split_frames(str(domain_dir), "")["train"]
    words = frequent_identifiers(tok, list(train["output"].astype(str)), k)
    parts = [tok(w, add_special_tokens=False)["input_ids"] for w in words]
    lm = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tok.add_tokens(words)
    lm.resize_token_embeddings(len(tok), mean_resizing=False)
    emb = lm.get_input_embeddings().weight
    new_ids = tok.convert_tokens_to_ids(words)
    with torch.no_grad():
        for i, ids in zip(new_ids, parts):
            emb[i] = emb[ids].mean(0)
    lm.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return list(new_ids)


def new_token_nll(model_dir: Path, adapter: Path, raw: dict, new_ids: list[int]) -> dict:
    """NLL of the test responses at the new tokens' positions and elsewhere, with a plain
    transformers + peft load of the saved adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edge_lam.data.encode import batches, encode_batch
    from edge_lam.training.evaluation import ServerModel
    from edge_lam.models.lora_model import load_tokenizer, torch_device

    cfg = RunConfig.from_run_config(raw)
    test = ServerModel.prepare(cfg, with_model=False).test
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter)).to(torch_device()).eval()
    tok = load_tokenizer(str(model_dir))
    new = torch.tensor(new_ids, device=torch_device())
    sums = {"new": [0.0, 0], "other": [0.0, 0]}
    with torch.no_grad():
        for chunk in batches(test, 8):
            batch = {k: v.to(torch_device()) for k, v in encode_batch(tok, chunk, cfg).items()}
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(),
                                                    labels.clamp(min=0), reduction="none")
            valid = labels != -100
            is_new = torch.isin(labels, new) & valid
            for key, mask in (("new", is_new), ("other", valid & ~is_new)):
                sums[key][0] += float(nll[mask].sum())
                sums[key][1] += int(mask.sum())
    return {f"nll_{k}": (s / n if n else None) for k, (s, n) in sums.items()} | {
        "new_token_positions": sums["new"][1]}


def part_new_vocab(args, work: Path) -> dict:
    model = args.models.split(",")[0]
    folder = work / "extended-model"
    new_ids = extended_model(model, Path(args.data) / "codealpaca", args.new_tokens, folder)
    out = {"model": short(model), "new_tokens": len(new_ids), "setups": []}
    for i, setup in enumerate(("lora only", "lora + own rows")):
        t0 = time.perf_counter()
        raw = base_raw(args, str(folder), "codealpaca", work / "nv", **SETUPS[setup])
        rows, run_dir = run_inprocess(raw, args.devices, 100 + i, SERVER)
        res = summarise(rows, setup, t0) | new_token_nll(folder, run_dir / "adapter", raw,
                                                         new_ids)
        cfg_file = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
        trained = next(iter((cfg_file.get("trainable_token_indices") or {"": []}).values()))
        res["new_rows_trained"] = len(set(trained) & set(new_ids))
        print(json.dumps(res), flush=True)
        out["setups"].append(res)
    return out


# ---------------------------------------------------------------------------- report
def fmt_bytes(n: float) -> str:
    return f"{n / 1e6:,.2f} MB" if n >= 1e5 else f"{n / 1e3:,.1f} kB"


# sections whose command stands for several processes (placeholders D / S / LR): they were
# put together from per-process runs by hand, before `--tag` runs wrote their own sections
ASSEMBLED = re.compile(r"--domains D --setups S|one process per domain x setup")
ASSEMBLED_NOTE = ("**Assembled by hand** from one process per domain x setup (the command's D, "
                  "S and LR stand for each process's values; the machine and total seconds are "
                  "one process's, and no commit was recorded). Rerun each process with `--tag` "
                  "to replace this section with one the script writes whole.")


def render(result: dict, out: Path) -> None:
    lines = ["# S7 sub-model federated learning of the token embedding", ""]
    if "bytes" in result:
        b = result["bytes"]
        lines += ["## Bytes per device per round (payload: down + up)", "",
                  f"`{b['command']}`", "", f"Machine: {machine_line(b['machine'])}", "",
                  "The train split in IID partitions over `devices`; LoRA rank "
                  f"{b['rank']} on q_proj,v_proj, max {b['max_length']} tokens per example. "
                  "Plain rows: int64 id + float32 values (+ float32 count up). Secure "
                  "(secure aggregation over the round's union U of requests, all `devices` "
                  "in one round): down adds U's int64 ids, up is |U| x (d + 1) uint64 "
                  "(fixed-point count x value and count, masked). Full table: dense float32.",
                  "", "| model | domain | devices | case | rows per device | union U | down | "
                  "up | vs full table |", "|---|---|---:|---|---:|---:|---:|---:|---:|"]
        for r in b["rows"]:
            union = "-" if r.get("union") is None else f"{r['union']:,}"
            lines.append(f"| {r['model']} | {r['domain']} | {r['devices']} | {r['case']} | "
                         f"{r['rows']:,.0f} | {union} | "
                         f"{fmt_bytes(r['down'])} | {fmt_bytes(r['up'])} | "
                         f"{100 * r['vs_full']:.1f}% |")
        lines.append("")
    for key in sorted(k for k in result if k.startswith("quality")):
        q = result[key]
        title = q.get("title") or "Quality: test NLL per response token after the last round"
        lines += [f"## {title}", "",
                  f"`{q['command']}`", "", f"Machine: {machine_line(q['machine'])}", ""]
        if ASSEMBLED.search(q["command"]):
            lines += [ASSEMBLED_NOTE, ""]
        lines += [
                  f"{q['devices']} devices, {q['rounds']} rounds of {q['local_steps']} local "
                  f"steps (batch {q['batch']}), "
                  f"{q['eval_max']} test examples. Bytes: wire bytes per device per round "
                  "(metrics.jsonl).", "",
                  "| model | domain | setup | rows lr | NLL before | NLL after | vs full table "
                  "(same lr) | rows down | down | up |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in q["rows"]:
            lr = r.get("rows_lr", q["rows_lr"])
            full = next((x["final_nll"] for x in q["rows"] if x["model"] == r["model"] and
                         x["domain"] == r["domain"] and x["setup"] == "lora + full table"
                         and x.get("rows_lr", q["rows_lr"]) == lr), None)
            rel = f"{100 * (r['final_nll'] - full) / full:+.2f}%" if full else "-"
            lines.append(f"| {r['model']} | {r['domain']} | {r['setup']} | {lr:g} | "
                         f"{r['initial_nll']:.4f} | {r['final_nll']:.4f} | {rel} | "
                         f"{r['rows_requested']:,.0f} | {fmt_bytes(r['bytes_down'])} | "
                         f"{fmt_bytes(r['bytes_up'])} |")
        lines += [""] + [f"- {note}" for note in q.get("notes", [])]
        lines.append("")
    if "new_vocab" in result:
        n = result["new_vocab"]
        lines += ["## New vocabulary: code identifiers added to the tokenizer", "",
                  f"`{n['command']}`", "", f"Machine: {machine_line(n['machine'])}", "",
                  f"{n['new_tokens']} frequent Code Alpaca identifiers added to "
                  f"{n['model']}'s tokenizer (rows: mean of their sub-word rows). NLL of the "
                  "test responses, read back through `PeftModel.from_pretrained` of the saved "
                  "adapter, at the positions whose target is a new token and elsewhere.", "",
                  "| setup | NLL (all) | NLL at new tokens | NLL elsewhere | new-token "
                  "positions | new rows trained |", "|---|---:|---:|---:|---:|---:|"]
        for r in n["setups"]:
            new = "-" if r["nll_new"] is None else f"{r['nll_new']:.4f}"
            lines.append(f"| {r['setup']} | {r['final_nll']:.4f} | {new} | "
                         f"{r['nll_other']:.4f} | {r['new_token_positions']} | "
                         f"{r['new_rows_trained']} |")
        lines.append("")
    (out / "submodel.md").write_text("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("bytes", "quality", "new-vocab"), default="bytes")
    p.add_argument("--models", default="smollm2-135m-instruct")
    p.add_argument("--domains", default="codealpaca,gsm8k")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--setups", default=",".join(SETUPS))
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--bytes-devices", type=int, nargs="*", default=[4, 32],
                   help="--part bytes: the data split over this many devices, each case")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--eval-max", type=int, default=100)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rows-lr", type=float, default=2e-4)
    p.add_argument("--epsilons", type=float, nargs="*", default=[3.0, 5.0])
    p.add_argument("--new-tokens", type=int, default=50)
    p.add_argument("--tag", default="", help="--part quality: kept under quality/<tag> "
                   "(its own table) instead of quality")
    p.add_argument("--title", default="", help="--part quality: that table's heading")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "submodel"))
    p.add_argument("--render", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    if args.render:
        render(read_json(out / "submodel.json"), out)
        return
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="submodel-"))
    settings = {k: getattr(args, k) for k in ("devices", "bytes_devices", "rounds", "local_steps", "batch",
                                               "max_length", "eval_max", "rank", "rows_lr")}
    if args.part == "bytes":
        key, body = "bytes", {"rows": part_bytes(args)}
    elif args.part == "quality":
        key = f"quality/{args.tag}" if args.tag else "quality"
        body = {"rows": part_quality(args, work), "title": args.title}
    else:
        key, body = "new_vocab", part_new_vocab(args, work)
    result = read_json(out / "submodel.json") if (out / "submodel.json").is_file() else {}
    result[key] = {**settings, **body, **provenance(started)}
    result.update(provenance(started))
    write_json(out / "submodel.json", result)
    render(result, out)


if __name__ == "__main__":
    main()
