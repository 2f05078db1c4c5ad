"""`serve.kind='cot'`: chain-of-thought steps as micro-services on the devices (S8).

The chain of each GSM8K test question (eval.max-examples of `data.path`, `task='causal-lm'`)
is generated `serve.cot-step-tokens` greedy tokens at a time, at most `serve.cot-max-steps`
steps; step s runs on the device the placement chose for it (`placement`, method
`serve.cot-placement`, at most `serve.cot-device-steps` steps per device). Each step is a
Flower QUERY (`query.serve`, config kind 'cot', op 'step') carrying the questions and their
chains so far; the server appends each step's text and stops a chain when it ended or states
'#### <number>' completely (`edge_lam.serving.steps.chain_done`).

Before placing, one device times a step's parts (op 'profile'): seconds(L, n) = a + b L +
c (n - 1) for a context of L tokens and n new ones, its parameter and KV bytes. With
`fleet.ServeDevice` that predicts every step's latency on the fleet `serve.fleet` (simulated
device k is the k-th connected device by partition id). `serve.cot-baseline` also answers
each question in one step of the whole budget on the single device of least predicted
latency (monolithic). Results: `results/<run-id>/serve_cot.json` (exact match, tokens,
bytes moved, memory per device and summed, measured and predicted seconds, every placement
method's plan and predicted latency) and `serve_cot_questions.jsonl` (each chain's steps).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid

from server_app.serve.fleet import ServeDevice, fleet
from server_app.serve.mode import MESSAGE_TYPE
from server_app.serve.placement import METHODS, ChainSteps, chain_problem, solve
from edge_lam.config.run_config import RunConfig
from edge_lam.training.evaluation import ServerModel
from edge_lam.messaging import connected_by_partition
from edge_lam.serving.generation import final_number
from edge_lam.logs import get_logger
from edge_lam.results import atomic_write_text
from edge_lam.serving.steps import chain_done

log = get_logger()
MIB = 2.0 ** 20


def step_seconds(costs: dict, context: float, new: float) -> float:
    """Seconds of one step on the measuring machine (the profile's linear model)."""
    return costs["prefill_s"] + costs["prefill_per_token_s"] * context + \
        costs["decode_per_token_s"] * max(new - 1, 0)


def step_memory_mib(costs: dict, context: float, new: float) -> float:
    """Parameters + KV cache of the step's whole sequence, MiB (S8 capacity)."""
    return (costs["param_bytes"] + costs["kv_bytes_per_token"] * (context + new)) / MIB


def planned_steps(costs: dict, prompt_tokens: float, question_bytes: float,
                  bytes_per_token: float, step_tokens: int, steps: int,
                  context: str = "full") -> ChainSteps:
    """The plan's steps: full steps of `step_tokens`, step s with context prompt + s k
    (`serve.cot-context='full'`) or prompt + min(s, 1) k (`'last'`: the previous step
    only)."""
    carried = step_tokens * (np.arange(steps) if context == "full"
                             else np.minimum(np.arange(steps), 1))  # (S,)
    context_tokens = prompt_tokens + carried
    return ChainSteps(
        compute_s=np.array([step_seconds(costs, c, step_tokens) for c in context_tokens]),
        in_bytes=question_bytes + bytes_per_token * carried,
        out_bytes=np.full(steps, bytes_per_token * step_tokens),
        memory_mib=np.array([step_memory_mib(costs, c, step_tokens) for c in context_tokens]))


def chain_latency(costs: dict, devices: list[ServeDevice], steps: list[dict]) -> float:
    """Predicted seconds of a realised chain, step i on devices[i]: down + compute + up."""
    return float(sum(d.send_s(s["bytes_down"], up=False) +
                     d.compute_s(step_seconds(costs, s["context_tokens"], s["new_tokens"])) +
                     d.send_s(s["bytes_up"], up=True) for d, s in zip(devices, steps)))


def memory_use(costs: dict, placed: list[list[dict]], names: list[str]) -> dict:
    """Per device: parameters + the largest KV cache it held (MiB); the peak and the sum over
    the devices that ran at least one step (each holds the whole model)."""
    need: dict[str, float] = {}
    for chain in placed:
        for step in chain:
            name = names[step["device"]]
            need[name] = max(need.get(name, 0.0), step_memory_mib(
                costs, step["context_tokens"], step["new_tokens"]))
    return {"per_device_mib": need, "peak_mib": max(need.values(), default=0.0),
            "sum_mib": float(sum(need.values())), "devices": len(need)}


def run(grid: Grid, context: Context, cfg: RunConfig) -> Path:
    server_model = ServerModel.prepare(cfg, with_model=False)
    questions, refs = list(server_model.test.texts), list(server_model.test.responses)
    nodes, devices = _fleet_nodes(grid, cfg)
    run_dir = (Path(cfg.results_dir) / str(context.run_id)).resolve()
    started = time.perf_counter()
    costs = _profile(grid, nodes[0], questions[0], cfg)
    shape = _question_shape(cfg, questions)
    k, s_max = cfg.serve.cot_step_tokens, cfg.serve.cot_max_steps
    plan_steps = planned_steps(costs, shape["prompt_tokens"], shape["question_bytes"],
                               shape["bytes_per_token"], k, s_max, cfg.serve.cot_context)
    problem = chain_problem(plan_steps, devices, cfg.serve.cot_device_steps)
    plans = {m: solve(problem, m, cfg.seed) for m in METHODS}
    plan = plans[cfg.serve.cot_placement]
    log.info("serve cot: %d questions, steps of %d tokens (at most %d) placed %s: %s; "
             "predicted %.2f s per chain", len(questions), k, s_max, plan.method,
             " -> ".join(devices[d].name for d in plan.devices), plan.seconds)
    chains = _generate(grid, cfg, questions, [nodes[d] for d in plan.devices], k,
                       list(plan.devices))
    report = {"questions": len(questions), "step_tokens": k, "max_steps": s_max,
              "costs": costs, "question_shape": shape,
              "fleet": [vars(d) for d in devices], "nodes": nodes,
              "placement": cfg.serve.cot_placement,
              "cot": _summary(chains, refs, costs, devices, plan.devices),
              "methods": {m: {"devices": [devices[d].name for d in p.devices],
                              "planned_s": p.seconds, "solve_s": p.solve_s,
                              "predicted_latency_s": _mean_latency(costs, devices, chains,
                                                                   p.devices)}
                          for m, p in plans.items()}}
    mono = None
    if cfg.serve.cot_baseline:
        single = chain_problem(planned_steps(costs, shape["prompt_tokens"],
                                             shape["question_bytes"],
                                             shape["bytes_per_token"], k * s_max, 1),
                               devices, 1)
        best = solve(single, "exact").devices[0]
        mono = _generate(grid, cfg, questions, [nodes[best]], k * s_max, [best])
        report["monolithic"] = _summary(mono, refs, costs, devices, (best,))
    report["wall_s"] = time.perf_counter() - started
    _write(run_dir, report, cfg, questions, refs, chains, mono)
    _log_summary(report)
    return run_dir


def _fleet_nodes(grid: Grid, cfg: RunConfig) -> tuple[list[int], list[ServeDevice]]:
    """The connected devices by partition id, paired with serve.fleet's devices in order."""
    nodes = connected_by_partition(grid, cfg.serve.timeout, cfg.min_devices, 1,
                                   "serve.timeout")
    devices = fleet(cfg.serve.fleet)
    n = min(len(nodes), len(devices))
    if n < len(nodes) or n < len(devices):
        log.warning("serve cot: %d connected devices, %d in serve.fleet: using the first %d "
                    "of each", len(nodes), len(devices), n)
    return nodes[:n], devices[:n]


def _ask(grid: Grid, node: int, config: dict, cfg: RunConfig) -> Message:
    msg = Message(RecordDict({"config": ConfigRecord({"kind": "cot", **config})}),
                  dst_node_id=node, message_type=MESSAGE_TYPE)
    replies = list(grid.send_and_receive([msg], timeout=cfg.serve.timeout))
    if not replies:
        raise RuntimeError(f"node {node} sent no CoT reply within serve.timeout="
                           f"{cfg.serve.timeout:g} s: raise it or check the device")
    if replies[0].has_error():
        raise RuntimeError(f"node {node} failed a CoT {config['op']}: "
                           f"{replies[0].error.reason}")
    return replies[0]


def _profile(grid: Grid, node: int, question: str, cfg: RunConfig) -> dict:
    reply = _ask(grid, node, {"op": "profile", "question": question}, cfg)
    return {k: float(v) for k, v in reply.content["costs"].items()}


def _question_shape(cfg: RunConfig, questions: list[str]) -> dict:
    """Mean prompt tokens (posed as the devices pose it), question bytes, bytes per token."""
    from edge_lam.data.encode import pose
    from edge_lam.models.lora_model import load_tokenizer, resolve_model_source

    tokenizer = load_tokenizer(resolve_model_source(cfg.model))
    tokens = [len(pose(tokenizer, cfg, q)) for q in questions]
    raw = [len(tokenizer(q, add_special_tokens=False)["input_ids"]) for q in questions]
    nbytes = [len(q.encode()) for q in questions]
    return {"prompt_tokens": float(np.mean(tokens)), "question_bytes": float(np.mean(nbytes)),
            "bytes_per_token": float(sum(nbytes) / max(sum(raw), 1))}


def _generate(grid: Grid, cfg: RunConfig, questions: list[str], step_nodes: list[int],
              max_tokens: int, step_devices: list[int]) -> list[dict]:
    """Every chain, step s sent to step_nodes[s] for all open questions of a batch."""
    chains = [{"chain": "", "steps": [], "done": False} for _ in questions]
    size = cfg.serve.cot_batch_size
    for start in range(0, len(questions), size):
        batch = list(range(start, min(start + size, len(questions))))
        for s, node in enumerate(step_nodes):
            open_ = [i for i in batch if not chains[i]["done"]]
            if not open_:
                break
            seen = [chains[i]["chain"] if cfg.serve.cot_context == "full"
                    else chains[i].get("last", "") for i in open_]  # what the step sees
            reply = _ask(grid, node, {"op": "step", "step": s, "max-tokens": max_tokens,
                                      "questions": [questions[i] for i in open_],
                                      "chains": seen}, cfg)
            _append(chains, open_, reply, node, step_devices[s], questions,
                    cfg.serve.cot_context)
    return chains


def _append(chains: list[dict], open_: list[int], reply: Message, node: int, device: int,
            questions: list[str], context: str = "full") -> None:
    got = reply.content["steps"]
    texts, ended = list(got["texts"]), list(got["ended"])
    if len(texts) != len(open_):
        raise RuntimeError(f"node {node} answered {len(texts)} steps for {len(open_)} chains")
    secs = float(reply.content["metrics"]["seconds"]) / len(open_)
    peak = float(reply.content["metrics"]["peak-memory-bytes"])
    for j, i in enumerate(open_):
        c = chains[i]
        seen = c["chain"] if context == "full" else c.get("last", "")
        c["steps"].append({"node": node, "device": device, "new_tokens": int(got["new-tokens"][j]),
                           "context_tokens": int(got["context-tokens"][j]),
                           "bytes_down": len(questions[i].encode()) + len(seen.encode()),
                           "bytes_up": len(texts[j].encode()), "measured_s": secs,
                           "peak_memory_bytes": peak})
        c["chain"] += texts[j]
        c["last"] = texts[j]
        c["done"] = chain_done(c["chain"], bool(ended[j]))


def _mean_latency(costs: dict, devices: list[ServeDevice], chains: list[dict],
                  placement: tuple[int, ...]) -> float:
    """Mean predicted latency of the realised chains had step s run on placement[s]."""
    return float(np.mean([chain_latency(costs, [devices[placement[s]] for s in
                                                range(len(c["steps"]))], c["steps"])
                          for c in chains]))


def _summary(chains: list[dict], refs: list[str], costs: dict, devices: list[ServeDevice],
             placement: tuple[int, ...]) -> dict:
    hits = [final_number(c["chain"]) is not None and
            final_number(c["chain"]) == final_number(r) for c, r in zip(chains, refs)]
    steps = [c["steps"] for c in chains]
    return {"exact_match": float(np.mean(hits)),
            "devices": [devices[d].name for d in placement],
            "tokens": float(np.mean([sum(s["new_tokens"] for s in st) for st in steps])),
            "steps": float(np.mean([len(st) for st in steps])),
            "bytes_down": float(np.mean([sum(s["bytes_down"] for s in st) for st in steps])),
            "bytes_up": float(np.mean([sum(s["bytes_up"] for s in st) for st in steps])),
            "prefill_tokens": float(np.mean([sum(s["context_tokens"] for s in st)
                                             for st in steps])),
            "measured_s": float(np.sum([sum(s["measured_s"] for s in st) for st in steps])),
            "predicted_latency_s": _mean_latency(costs, devices, chains, placement),
            "memory": memory_use(costs, steps, [d.name for d in devices]),
            "peak_memory_reported_mib": max((s["peak_memory_bytes"] for st in steps
                                             for s in st), default=0.0) / MIB}


def _write(run_dir: Path, report: dict, cfg: RunConfig, questions: list[str],
           refs: list[str], chains: list[dict], mono: list[dict] | None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = [json.dumps({"question": i, "reference": refs[i], "chain": c["chain"],
                        "correct": final_number(c["chain"]) is not None and
                        final_number(c["chain"]) == final_number(refs[i]), "steps": c["steps"]}
                       | ({"monolithic": mono[i]["chain"]} if mono else {}))
            for i, c in enumerate(chains)]
    atomic_write_text(run_dir / "serve_cot_questions.jsonl", "\n".join(rows) + "\n")
    atomic_write_text(run_dir / "serve_cot.json", json.dumps(
        {**report, "run_config": cfg.to_dict()}, indent=1))


def _log_summary(report: dict) -> None:
    for name in ("cot", "monolithic"):
        if name in report:
            r = report[name]
            log.info("serve cot %-10s exact match %.4f, %.1f tokens, %.1f steps, %.0f bytes "
                     "moved, predicted %.2f s per question, memory peak %.0f MiB / sum %.0f "
                     "MiB", name, r["exact_match"], r["tokens"], r["steps"],
                     r["bytes_down"] + r["bytes_up"], r["predicted_latency_s"],
                     r["memory"]["peak_mib"], r["memory"]["sum_mib"])
