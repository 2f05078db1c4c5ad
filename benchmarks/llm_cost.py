"""An LLM device's cost: seconds per local step and peak resident memory of LoRA instruction
tuning (SmolLM2-135M-Instruct, then Gemma-3-270M), per memory option, each in a fresh process,
and where the peak goes.

GSM8K prompt/response pairs, batch 4, every sequence cut (prompt middle first,
`edge_lam.data.encode.fit`) and padded to exactly 256 tokens, LoRA on q,k,v,o + MLP. Options:

- `naive`: fp32, the model's own loss (`labels=`): logits for every position x vocabulary.
- `response-logits`: our default: logits only where a response token is predicted.
- `chunked`: + `train.loss-chunk=64` (vocabulary projection 64 tokens at a time).
- `checkpointing`: + `train.gradient-checkpointing=true`.
- `bf16`: + `train.dtype=bfloat16` frozen weights (LoRA stays fp32).
- `mmap-threshold`: + `train.malloc-mmap-threshold=4096` (glibc, `edge_lam.training.memory`).
- `malloc-trim`: + `train.malloc-trim=true` (the heap's free pages back to the OS after each
  forward pass and each step).
- `malloc-trim-fp32`: the same in float32 (bf16 against fp32 step time, all else equal).

Each row records the peak's parts (`breakdown_mib`: interpreter + libraries, data +
tokenizer, the model's load, gradients + AdamW state, the rest during the steps), the RSS at
each phase (`phases_mib`), the tensors' exact sizes, glibc's live / held heap after the last
step, and per timed step the wall and CPU seconds and the minor page faults.

    python benchmarks/llm_cost.py --all              # every row (SmolLM2, then Gemma-3)
    python benchmarks/llm_cost.py --render           # llm_cost.md from llm_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (command_line, machine_info, machine_line,  # noqa: E402
                               provenance, read_json, run_fresh, write_json)
from benchmarks.federation import read_env_file  # noqa: E402

_BEST = {"train.loss-chunk": 64, "train.gradient-checkpointing": True,
         "train.dtype": "bfloat16"}
OPTIONS = {  # name -> run-config overrides (cumulative, as a device would turn them on)
    "naive": {},
    "response-logits": {},
    "chunked": {"train.loss-chunk": 64},
    "checkpointing": {"train.loss-chunk": 64, "train.gradient-checkpointing": True},
    "bf16": _BEST,
    # + glibc's mmap threshold fixed (edge_lam/training/memory.py): large tensors never pile up in the heap
    "mmap-threshold": {**_BEST, "train.malloc-mmap-threshold": 4096},
    # + the heap's free pages handed back after each forward pass and each step
    "malloc-trim": {**_BEST, "train.malloc-mmap-threshold": 4096, "train.malloc-trim": True},
    # the same in float32: the step time of bfloat16 against float32, all else equal
    "malloc-trim-fp32": {**_BEST, "train.malloc-mmap-threshold": 4096,
                         "train.malloc-trim": True, "train.dtype": "float32"},
}
RESULTS = Path(__file__).parent / "results"
PI_RAM_MIB = {"Raspberry Pi 4 (4 GB)": 4096, "Raspberry Pi 5 (8 GB)": 8192}
# what the OS and services leave free on a Pi (Raspberry Pi OS Lite idles at ~200-300 MB)
OS_RESERVE_MIB = 512
MIB = 2**20


def _status() -> dict[str, float]:
    """VmRSS / VmHWM / RssAnon / RssFile now, in MiB."""
    from edge_lam.training.memory import process_status

    return {k: v / 1024 for k, v in process_status().items()}


def _batches(cfg, tok, ex, steps: int, batch: int, seq: int) -> list[dict]:
    """The GSM8K batches, every one cut and padded to exactly `seq` tokens."""
    import torch

    from edge_lam.data.encode import encode_pairs

    out = []
    for i in range(steps):
        sl = slice(i * batch, (i + 1) * batch)
        enc = encode_pairs(tok, ex.texts[sl], ex.responses[sl], cfg)
        pad = seq - enc["input_ids"].shape[1]  # exactly `seq` tokens, as the probe
        out.append({k: torch.nn.functional.pad(v, (0, pad), value=v_pad)
                    for (k, v), v_pad in zip(enc.items(), (tok.pad_token_id, 0, -100))})
    return out


def _mark() -> tuple[float, float, int, float]:
    """(wall s, CPU s, minor page faults, RSS MiB) now."""
    return (time.perf_counter(), sum(os.times()[:2]),
            resource.getrusage(resource.RUSAGE_SELF).ru_minflt, _status()["VmRSS"])


def _steps(option: str, cfg, net, batches: list[dict], warmup: int) -> dict:
    """AdamW steps over `batches` through the app's own local loop (`run_steps`, with
    `train.malloc-trim`'s release); per timed step: wall and CPU seconds, minor page faults
    (pages the process took fresh from the OS), and per step the RSS after it."""
    import torch

    from edge_lam.training.memory import releaser
    from edge_lam.training.loop import run_steps, task_loss

    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    net.train()
    marks = []

    def next_batch() -> dict:
        marks.append(_mark())
        return batches[len(marks) - 1]

    def own_loss(batch: dict):  # `naive`: the model's own loss over the full vocabulary
        loss = net(**batch).loss
        return loss, {"loss": loss}

    parts = run_steps(len(batches), next_batch, own_loss if option == "naive" else
                      task_loss(net, cfg), opt, "llm_cost", str, release=releaser(cfg))
    marks.append(_mark())
    spans = [[b - a for a, b in zip(marks[i][:3], marks[i + 1][:3])]
             for i in range(warmup, len(batches))]  # warm-up steps are not timed
    return {"step_s": [s[0] for s in spans], "cpu_s": [s[1] for s in spans],
            "faults": [s[2] for s in spans], "loss": [p["loss"] for p in parts[warmup:]],
            "rss_after_step_mib": [m[3] for m in marks[1:]]}


def _tensor_mib(net) -> dict[str, float]:
    """Exact sizes: the frozen weights in their dtype (a tied matrix once), the trainable
    (LoRA) factors, and what training adds per trainable float32 value: its gradient and
    AdamW's two moments."""
    seen, frozen, trainable = set(), 0, 0
    for p in net.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        if p.requires_grad:
            trainable += p.numel() * p.element_size()
        else:
            frozen += p.numel() * p.element_size()
    return {"frozen_weights": frozen / MIB, "lora": trainable / MIB,
            "grads_adamw": 3 * trainable / MIB}


def _breakdown(phases: dict, tensors: dict, peak: float) -> dict[str, float]:
    """Peak RSS in parts that add up to it: interpreter + libraries (imports, the model's
    code included), data + tokenizer, the loaded model (frozen weights, LoRA factors, module
    objects), gradients + AdamW state (exact sizes; allocated in the first step), and the rest
    of the peak during the steps (activations, and freed memory the allocator still holds)."""
    out = {"interpreter_libraries": phases["imports"],
           "data_tokenizer": phases["data_tokenizer"] - phases["imports"],
           "weights": phases["model"] - phases["data_tokenizer"],
           "lora_optimizer": tensors["grads_adamw"]}
    out["step_activations"] = peak - phases["model"] - out["lora_optimizer"]
    return out


def _import_model_code(source: str) -> None:
    """transformers imports a model's modules when it first builds one: import them now so
    that the model's load counts its weights, not its code."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

    MODEL_FOR_CAUSAL_LM_MAPPING.get(type(AutoConfig.from_pretrained(source)), None)


def measure(option: str, rank: int, steps: int, batch: int, seq: int, data: str,
            model: str, warmup: int = 2) -> dict:
    started, load0 = _status()["VmRSS"], os.getloadavg()[0]
    import torch

    from edge_lam.config.run_config import RunConfig
    from edge_lam.data.text import load_split_frames, resolve_columns, to_examples
    from edge_lam.training.memory import heap_in_use
    from edge_lam.models.lora_model import get_lora_model, load_tokenizer, resolve_model_source

    cfg = RunConfig.from_run_config({"model": model, "task": "causal-lm", "strategy": "fedavg",
                                     "lora.fedavg-rank": rank, "train.max-length": seq,
                                     "data.path": data, **OPTIONS[option]})
    source = resolve_model_source(cfg.model)
    _import_model_code(source)
    phases = {"start": started, "imports": _status()["VmRSS"]}
    frames = load_split_frames(str(Path(data).resolve()), "")
    ex = to_examples(frames["train"], resolve_columns(frames["train"], cfg), ())
    tok = load_tokenizer(source)
    batches = _batches(cfg, tok, ex, steps + warmup, batch, seq)
    phases["data_tokenizer"] = _status()["VmRSS"]
    t0 = time.perf_counter()
    net = get_lora_model(cfg, (), rank)
    load_s = time.perf_counter() - t0
    phases["model"], phases["load_peak"] = _status()["VmRSS"], _status()["VmHWM"]
    rec = _steps(option, cfg, net, batches, warmup=warmup)
    peak, tensors, heap = _status()["VmHWM"], _tensor_mib(net), heap_in_use()
    return {"model": model, "option": option, "rank": rank, "batch": batch, "seq": seq,
            "warmup": warmup, "platform": platform.machine(),
            "overrides": OPTIONS[option], "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "load_s": load_s, "loadavg": [load0, os.getloadavg()[0]],
            "trainable_params": sum(p.numel() for p in net.parameters() if p.requires_grad),
            "step_s_median": statistics.median(rec["step_s"]),
            "cpu_s_median": statistics.median(rec["cpu_s"]),
            "faults_median": statistics.median(rec["faults"]), **rec,
            "response_tokens_per_batch": statistics.mean(
                int((b["labels"] != -100).sum()) for b in batches),
            "phases_mib": phases, "tensors_mib": tensors,
            "breakdown_mib": _breakdown(phases, tensors, peak),
            "heap_mib": {k: v / MIB for k, v in (heap or {}).items()},
            "rss_before_model_mib": phases["data_tokenizer"], "peak_rss_mib": peak,
            "machine": machine_line(machine_info())}


def _fits(peak: float) -> str:
    return " / ".join("yes" if peak + OS_RESERVE_MIB <= ram else "no"
                      for ram in PI_RAM_MIB.values())


def _cost_table(rows: list[dict]) -> list[str]:
    lines = ["| model | option | rank | s per step (median) | CPU s per step | page faults "
             "per step | peak RSS MiB | trainable params | fits a Pi 4 (4 GB) / Pi 5 (8 GB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cpu = f"{r['cpu_s_median']:.2f}" if "cpu_s_median" in r else "-"
        faults = f"{r['faults_median']:,.0f}" if "faults_median" in r else "-"
        lines.append(f"| {_model_name(r)} | {r['option']} | {r['rank']} | "
                     f"{r['step_s_median']:.2f} | {cpu} | {faults} | {r['peak_rss_mib']:.0f} | "
                     f"{r['trainable_params']:,} | {_fits(r['peak_rss_mib'])} |")
    return lines


BREAKDOWN = (("interpreter_libraries", "interpreter + libraries"),
             ("data_tokenizer", "data + tokenizer"), ("weights", "model load"),
             ("lora_optimizer", "grads + AdamW"), ("step_activations", "during the step"))


def _breakdown_table(rows: list[dict]) -> list[str]:
    head = " | ".join(label for _, label in BREAKDOWN)
    lines = [f"| model | option | rank | {head} | = peak | load peak | frozen weights "
             "(exact) | heap live / held after the last step |",
             "|---|---|---|" + "---|" * (len(BREAKDOWN) + 4)]
    for r in rows:
        if "breakdown_mib" not in r:
            continue
        b, heap = r["breakdown_mib"], r.get("heap_mib") or {}
        parts = " | ".join(f"{b[k]:.0f}" for k, _ in BREAKDOWN)
        held = f"{heap['live']:.0f} / {heap['held']:.0f}" if heap else "-"
        lines.append(f"| {_model_name(r)} | {r['option']} | {r['rank']} | {parts} | "
                     f"{r['peak_rss_mib']:.0f} | {r['phases_mib']['load_peak']:.0f} | "
                     f"{r['tensors_mib']['frozen_weights']:.0f} | {held} |")
    return lines


def _model_name(row: dict) -> str:
    return Path(row.get("model", "smollm2-135m-instruct")).name


def render(rows: list[dict]) -> str:
    first = rows[0]
    loads = [x for r in rows for x in r.get("loadavg", [])]
    load = (f" Load average (1 min) while the rows ran: {min(loads):.1f}-{max(loads):.1f} on "
            f"{first['cpus']} cores (other work shared the machine: step times are noisy; "
            "CPU seconds and page faults less so, peak RSS hardly)." if loads else "")
    return "\n".join([
        f"GSM8K pairs (SmolLM2: chat template; Gemma-3 base: plain), batch {first['batch']} x "
        f"{first['seq']} tokens (about {first['response_tokens_per_batch']:.0f} response tokens "
        "per batch for SmolLM2), LoRA on q,k,v,o,gate,up,down; median of the timed steps after "
        f"{first.get('warmup', 2)} warm-up steps; each row a fresh process.", "",
        f"Machine: {first['machine']}.{load}", "", *_cost_table(rows), "",
        f"\"Fits\": peak RSS + {OS_RESERVE_MIB} MiB for the OS within the board's RAM. Options "
        "are cumulative (each row adds to the one before, from `response-logits` on); "
        "`naive` is the model's own loss with full-vocabulary logits at every position; "
        "`mmap-threshold` adds `train.malloc-mmap-threshold=4096` (glibc's M_MMAP_THRESHOLD, "
        "edge_lam/training/memory.py), `malloc-trim` adds `train.malloc-trim=true` (malloc_trim after each "
        "forward pass and each step), `malloc-trim-fp32` is the same in float32. Page faults: "
        "pages the process took fresh from the OS during a step (the price of both).", "",
        "Where the peak goes (MiB; the first five columns add up to the peak):", "",
        *_breakdown_table(rows), "",
        "Interpreter + libraries: RSS after importing torch, transformers, peft, the app and "
        "the model's code. Model load: RSS the loaded model (with its LoRA factors) adds; "
        "frozen weights (exact) is the tensors' own size; load peak: the highest RSS up to "
        "then. Grads + AdamW: 12 bytes per trainable parameter (exact). During the step: the "
        "rest of the peak, activations and freed memory that glibc's heap still holds "
        "(live / held: mallinfo2's allocated bytes / the heap and mapped blocks).", "",
        "Command: `python benchmarks/llm_cost.py --all`."])


ARM64_OPTIONS = ("malloc-trim", "malloc-trim-fp32")  # bf16 and fp32, all else equal


def run_arm64(args) -> None:
    """The bf16 and fp32 rows of SmolLM2 under QEMU user mode (`QEMU_CPU=args.qemu_cpu`) and
    the same rows on this host, each in a fresh process, into
    results/devices/llm_cost_arm64.{json,md}. Emulated step times are a relative hint only
    (QEMU translates every NEON instruction); peak RSS under emulation is the QEMU process's,
    the emulated program's memory plus QEMU's own (translated code)."""
    env = read_env_file(args.arm64)
    _convert_once(args.model)  # on the host: the converted folder is the same on aarch64
    out = args.out / "devices" / "llm_cost_arm64.json"
    kept = read_json(out)["rows"] if out.is_file() else []
    rows, started = [], time.perf_counter()
    for option in args.arm64_options.split(","):
        for python, extra in ((env["PY"], {"QEMU_CPU": args.qemu_cpu}), (sys.executable, {})):
            rows.append(run_fresh(__file__, "--option", option, "--rank", "8", "--steps",
                                  str(args.steps), "--warmup", str(args.warmup), "--batch",
                                  str(args.batch), "--seq", str(args.seq), "--data",
                                  args.data, "--model", args.model, python=python, env=extra))
            rows[-1]["qemu_cpu"] = extra.get("QEMU_CPU")
            rows[-1]["command"] = command_line()
            print(f"{rows[-1]['platform']} {option}: {rows[-1]['step_s_median']:.1f} s/step, "
                  f"{rows[-1]['peak_rss_mib']:.0f} MiB", flush=True)
    key = ("platform", "option", "batch", "seq", "rank")
    new = {tuple(r[k] for k in key) for r in rows}
    doc = {"rows": [r for r in kept if tuple(r[k] for k in key) not in new] + rows,
           **provenance(started)}
    write_json(out, doc)
    out.with_suffix(".md").write_text(render_arm64(doc) + "\n")


def render_arm64(doc: dict) -> str:
    """The emulated rows beside the same rows on the host, run by the same command."""
    rows = sorted(doc["rows"], key=lambda r: (r["batch"] * r["seq"], r["option"],
                                              not r["qemu_cpu"]))
    first = next(r for r in rows if r["qemu_cpu"])
    lines = ["| batch x tokens | platform | option | frozen weights | warm-up + timed steps | "
             "s per step | CPU s per step | peak RSS MiB | loss, first timed step |",
             "|---|---|---|---|---|---|---|---|---|"]
    ratio = {}
    for row in rows:
        label = (f"aarch64, emulated ({row['qemu_cpu']})" if row["qemu_cpu"] else
                 f"{row['platform']} (this host)")
        dtype = row["overrides"].get("train.dtype", "bfloat16")
        ratio.setdefault((label, row["batch"], row["seq"]), {})[dtype] = row
        lines.append(f"| {row['batch']} x {row['seq']} | {label} | {row['option']} | {dtype} | "
                     f"{row['warmup']} + {len(row['step_s'])} | {row['step_s_median']:.1f} | "
                     f"{row['cpu_s_median']:.1f} | {row['peak_rss_mib']:.0f} | "
                     f"{row['loss'][0]:.4f} |")
    ratios = [f"{label}, {b} x {t}: {r['bfloat16']['step_s_median'] / r['float32']['step_s_median']:.2f}"
              f" (CPU s: {r['bfloat16']['cpu_s_median'] / r['float32']['cpu_s_median']:.2f})"
              for (label, b, t), r in ratio.items() if {"bfloat16", "float32"} <= r.keys()]
    return "\n".join([
        "# SmolLM2 LoRA training under emulated aarch64: bf16 against fp32", "",
        "SmolLM2-135M-Instruct, GSM8K pairs, r=8 on all 7 projections, the `malloc-trim` "
        "options of benchmarks/llm_cost.md in bfloat16 and in float32; each row a fresh "
        "process, emulated and host rows of one batch size run by the same command.", "",
        f"Machine: {machine_line(doc['machine'])}; emulated rows: {first['machine']} under "
        f"QEMU user mode, QEMU_CPU={first['qemu_cpu']} (a Raspberry Pi 4's core). A row with 0 warm-up "
        "steps times the first step, which includes one-time costs.", "",
        *lines, "",
        "bf16 step time / fp32 step time: " + ("; ".join(ratios) or "-") + ". Other work "
        "shared the host's 2 cores, which stretches wall seconds; CPU seconds less so.", "",
        "**Emulated: a relative hint, not a Pi's speed.** QEMU translates every aarch64 "
        "instruction on this x86 host, so absolute times say nothing about a Cortex-A72; the "
        "bf16/fp32 ratio hints at whether bf16 pays on a core without bf16 arithmetic: neither "
        "a Pi 4's Cortex-A72 nor a Pi 5's Cortex-A76 has bf16 instructions (they came with "
        "Armv8.6), while this host's x86 CPU multiplies bf16 matrices in hardware where it "
        "has AVX512-BF16 or AMX. Peak RSS under emulation is the QEMU process's: the "
        "program's memory plus QEMU's translated code.", "",
        "Commands: " + ", ".join(f"`{c}`" for c in dict.fromkeys(
            r.get("command", doc["command"]) for r in rows)) + "."])


def _convert_once(model: str) -> None:
    """Resolve `model` in a process of its own first: a GGUF conversion into the cache would
    otherwise count in the first row's peak."""
    import subprocess

    subprocess.run([sys.executable, "-c", "import sys; from edge_lam.models.lora_model import "
                    "resolve_model_source; resolve_model_source(sys.argv[1])", model],
                   check=True, cwd=Path(__file__).resolve().parents[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--option", choices=tuple(OPTIONS), default="response-logits")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" /
                                          "data" / "gsm8k"))
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--all", action="store_true", help="every option at r=8 and the best at "
                    "r=2 and r=16, then --gemma's rows, each in a fresh process")
    ap.add_argument("--gemma", default="gemma-3-270m", help="the second model of --all "
                    "(its bf16, malloc-trim and malloc-trim-fp32 rows; '' = none)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    ap.add_argument("--arm64", type=Path, metavar="ENV_SH", help="run the bf16 and fp32 "
                    "SmolLM2 rows under emulated aarch64: the env.sh deploy/emulate-arm64.sh "
                    "prints; writes results/devices/llm_cost_arm64.{json,md}")
    ap.add_argument("--qemu-cpu", default="cortex-a72", help="QEMU_CPU of --arm64 (a Pi 4)")
    ap.add_argument("--arm64-options", default=",".join(ARM64_OPTIONS),
                    help="the options --arm64 runs (rows of another batch or option are kept)")
    ap.add_argument("--render", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.render:
        doc = read_json(args.out / "llm_cost.json")
        (args.out / "llm_cost.md").write_text(render(doc["rows"]) + "\n")
        emulated = args.out / "devices" / "llm_cost_arm64.json"
        if emulated.is_file():
            emulated.with_suffix(".md").write_text(render_arm64(read_json(emulated)) + "\n")
        return
    if args.arm64:
        run_arm64(args)
        return
    if not args.all:
        print(json.dumps(measure(args.option, args.rank, args.steps, args.batch, args.seq,
                                 args.data, args.model, args.warmup)))
        return
    runs = [(args.model, o, 8) for o in OPTIONS] + \
        [(args.model, "malloc-trim", r) for r in (2, 16)]
    if args.gemma:
        runs += [(args.gemma, o, 8) for o in ("bf16", "malloc-trim", "malloc-trim-fp32")]
    rows, started = [], time.perf_counter()
    for model in dict.fromkeys(m for m, _, _ in runs):
        _convert_once(model)
    for model, option, rank in runs:
        rows.append(run_fresh(__file__, "--option", option, "--rank", str(rank), "--steps",
                              str(args.steps), "--batch", str(args.batch), "--seq",
                              str(args.seq), "--data", args.data, "--model", model))
        print(f"{model} {option} r={rank}: {rows[-1]['step_s_median']:.2f} s/step, "
              f"{rows[-1]['peak_rss_mib']:.0f} MiB", flush=True)
    write_json(args.out / "llm_cost.json", {"rows": rows, **provenance(started)})
    (args.out / "llm_cost.md").write_text(render(rows) + "\n")


if __name__ == "__main__":
    main()
