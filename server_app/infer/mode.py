"""`mode='infer'`: collaborative inference over the connected devices (S8, S6).

The ServerApp poses the test split of `data.path` (eval.max-examples of it), in batches of
`infer.batch-size`, to every device with a Flower QUERY (`query.infer`). Each device answers
with its own model (client_app.infer) and reports its cost:
- `task='lm-cls'`: labelled queries posed as instructions; label probabilities;
- `task='causal-lm'`: prompts (GSM8K, say); the greedy answer and each token's
  log-probability. Answers vote on their final number (GSM8K-style references, exact match)
  or their normalised text, each weighted where a method weighs by its sequence confidence
  (`report.generated_votes`). A device that errs, times out or replies malformed is left out
of that batch's votes, logged and counted; the job goes on. Then `report.summarise` scores
each member and each way of combining them, and everything lands in `results/<run-id>/`:

- `infer.json`: members, methods, the cascade's curve and choice, trust after each batch,
  failures; `infer_queries.jsonl`: per query, each member's label and each method's;
- `plots/infer_cascade.png` (accuracy vs seconds per query over the thresholds),
  `plots/infer_trust.png` (each member's trust batch after batch).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from server_app.infer.combine import accuracy, confidence, mean_probs
from server_app.infer.report import Answers, Knobs, choose_cascade, generated_votes, summarise
from edge_lam.config.run_config import RunConfig
from edge_lam.models.families import family
from edge_lam.training.evaluation import ServerModel
from edge_lam.messaging import connected_by_partition, origin, unicast
from edge_lam.logs import get_logger
from edge_lam.records import from_record
from edge_lam.results import atomic_write_text

log = get_logger()
MESSAGE_TYPE = f"{MessageType.QUERY}.infer"


def run(grid: Grid, context: Context, cfg: RunConfig) -> Path:
    """Collaborative inference (the family is checked at parse time,
    `server_app.modes.check_infer`)."""
    server_model = ServerModel.prepare(cfg, with_model=False)
    truth = np.asarray(server_model.test.labels)  # causal-lm: from the answers (generated_votes)
    run_dir = (Path(cfg.results_dir) / str(context.run_id)).resolve()
    nodes = _members(grid, cfg)
    log.info("infer: %d queries from %s to %d devices, %d per batch; results in %s",
             len(truth), server_model.data_source, len(nodes), cfg.infer.batch_size, run_dir)
    started = time.perf_counter()
    knobs = Knobs(cfg.infer.calibration, cfg.infer.alpha, cfg.infer.beta,
                  cfg.infer.trust_rate, cfg.infer.confidence, cfg.infer.cascade_loss)
    if cfg.infer.method == "cascade":
        return live_cascade(grid, nodes, server_model, truth, knobs, cfg, run_dir, started)
    answers = collect(grid, nodes, server_model.test.texts, server_model.label_names, cfg)
    if family(cfg).generates:
        truth = generated_votes(answers, server_model.test.responses, cfg.infer.calibration)
    report = summarise(answers, truth, knobs)
    write_results(run_dir, report, answers, truth, server_model.label_names,
                  time.perf_counter() - started, cfg, server_model.test.responses)
    for m in report["members"] + report["methods"]:
        log.info("infer: %-32s accuracy %.4f, %.3f s per query",
                 m.get("member", m.get("method")), m["accuracy"], m["seconds_per_query"])
    return run_dir


def _members(grid: Grid, cfg: RunConfig) -> list[int]:
    """The connected devices (at least `min-devices`, waited for up to infer.timeout),
    ordered by partition id."""
    return connected_by_partition(grid, cfg.infer.timeout, cfg.min_devices, cfg.min_devices,
                                  "infer.timeout")


def live_cascade(grid: Grid, nodes: list[int], server_model: ServerModel, truth: np.ndarray,
                 knobs: Knobs, cfg: RunConfig, run_dir: Path, started: float) -> Path:
    """`infer.method='cascade'`: every device answers the calibration queries (quality, cost,
    threshold); then each scored batch goes to the cheapest device only, and only its unsure
    queries go on to the next cheapest, whose answers are averaged in (`mean_probs`), and so
    on."""
    test = server_model.test
    texts, labels, refs = test.texts, server_model.label_names, test.responses
    generation = family(cfg).generates
    n_cal = min(cfg.infer.calibration, len(texts) - 1)
    calib, truth, plan = _calibrate(grid, nodes, texts[:n_cal], len(texts), labels, refs,
                                    truth, knobs, cfg)
    order = [nodes[i] for i in plan["order"]]
    rest = np.arange(n_cal, len(texts))
    stages, stage, failures = _cascade_stages(grid, order, texts, labels, refs, n_cal, plan,
                                              knobs, cfg)
    mean = _stage_means(stages, len(order) - 1, np.arange(len(rest)), refs, n_cal, generation)
    answer = np.where(stages.valid.any(axis=0), mean.argmax(axis=1), -1)
    if generation:
        truth = np.concatenate([truth[:n_cal], generated_votes(stages, refs[n_cal:], 0)])
    cost = np.nan_to_num(stages.seconds).sum(axis=0)
    live = {"accuracy": accuracy(answer, truth[rest]), "seconds_per_query": float(cost.mean()),
            "escalated": float((stage > 0).mean()), "queries": int(len(rest)),
            "saved_share": 1 - float(cost.mean()) / plan["everyone_seconds"]
            if plan["everyone_seconds"] > 0 else float("nan")}
    report = {"method": "cascade", "queries": int(len(texts)), "calibration": int(n_cal),
              "members": [{"member": n, "calibration_accuracy": accuracy(
                  np.where(calib.valid[i], calib.probs[i].argmax(axis=1), -1), truth[:n_cal]),
                  "seconds_per_query": float(np.nanmean(calib.seconds[i]))
                  if calib.valid[i].any() else float("nan")}
                  for i, n in enumerate(calib.names)],
              "plan": {**plan, "order": [calib.names[i] for i in plan["order"]]},
              "cascade_live": live, "failures": calib.failures + failures}
    _write_cascade(run_dir, report, stages, stage, answer, truth, refs, n_cal, labels, cfg,
                   started)
    log.info("infer cascade: accuracy %.4f at %.4f s per query, %.0f%% escalated, %.0f%% of "
             "asking everyone saved", live["accuracy"], live["seconds_per_query"],
             100 * live["escalated"], 100 * live["saved_share"])
    return run_dir


def _calibrate(grid: Grid, nodes: list[int], texts: list[str], queries: int,
               labels: tuple[str, ...], refs: list[str], truth: np.ndarray, knobs: Knobs,
               cfg: RunConfig) -> tuple[Answers, np.ndarray, dict]:
    """Every device answers the calibration queries `texts` (the first of `queries`):
    (their answers, the truth (generated answers: the calibration's from its answers), the
    cascade's plan)."""
    n_cal = len(texts)
    calib = collect(grid, nodes, texts, labels, cfg)
    if family(cfg).generates:
        truth = np.zeros(queries, int)  # the calibration's from its answers; the rest later
        truth[:n_cal] = generated_votes(calib, refs[:n_cal], n_cal)
    plan = choose_cascade(calib, truth[:n_cal], knobs)
    log.info("infer cascade: %s, threshold %.3f (calibration: %.4f at %.4f s per query vs "
             "everyone %.4f at %.4f s)", " -> ".join(calib.names[i] for i in plan["order"]),
             plan["threshold"], plan["calibration_accuracy"], plan["calibration_seconds"],
             plan["everyone_accuracy"], plan["everyone_seconds"])
    return calib, truth, plan


def _cascade_stages(grid: Grid, order: list[int], texts: list[str], labels: tuple[str, ...],
                    refs: list[str], n_cal: int, plan: dict, knobs: Knobs, cfg: RunConfig
                    ) -> tuple[Answers, np.ndarray, list[dict]]:
    """The scored queries (after the `n_cal` calibration ones), batch by batch, through the
    devices in `order` until sure: (each stage's answers, the stage each query stopped at,
    the failures)."""
    generation = family(cfg).generates
    rest = np.arange(n_cal, len(texts))
    stages = Answers([""] * len(order), np.zeros((len(order), len(rest), len(labels))),
                     np.zeros((len(order), len(rest)), bool),
                     np.full((len(order), len(rest)), np.nan), np.zeros(len(rest), int),
                     texts=np.full((len(order), len(rest)), None, dtype=object),
                     conf=np.zeros((len(order), len(rest))))
    stage = np.full(len(rest), len(order) - 1)
    failures: list[dict] = []
    for start in range(0, len(rest), cfg.infer.batch_size):
        open_ = np.arange(start, min(start + cfg.infer.batch_size, len(rest)))
        for s, node in enumerate(order):
            got = collect(grid, [node], [texts[n_cal + i] for i in open_], labels, cfg,
                          batch_offset=n_cal + start)
            failures += got.failures
            _take_stage(stages, s, open_, got, generation)
            if s == len(order) - 1:
                break
            mean = _stage_means(stages, s, open_, refs, n_cal, generation)
            done = stages.valid[:s + 1, open_].any(axis=0) & \
                (confidence(mean, knobs.confidence) >= plan["threshold"])
            stage[open_[done]] = s
            open_ = open_[~done]
            if not len(open_):
                break
    return stages, stage, failures


def _take_stage(stages: Answers, s: int, open_: np.ndarray, got: Answers,
                generation: bool) -> None:
    """Stage `s`'s answers `got` (one device) on the open queries into `stages`."""
    ok = open_[got.valid[0]]
    stages.names[s] = got.names[0]
    stages.valid[s, ok] = True
    stages.seconds[s, ok] = got.seconds[0][got.valid[0]]
    if generation:
        stages.texts[s, ok] = got.texts[0][got.valid[0]]
        stages.conf[s, ok] = got.conf[0][got.valid[0]]
    else:
        stages.probs[s, ok] = got.probs[0][got.valid[0]]


def _write_cascade(run_dir: Path, report: dict, stages: Answers, stage: np.ndarray,
                   answer: np.ndarray, truth: np.ndarray, refs: list[str], n_cal: int,
                   labels: tuple[str, ...], cfg: RunConfig, started: float) -> None:
    """`infer_queries.jsonl` (per scored query) and `infer.json` of a live cascade."""
    generation = family(cfg).generates
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = [json.dumps({"query": int(n_cal + i), "label": int(truth[n_cal + i]),
                        "answer": int(answer[i]), "stage": int(stage[i]),
                        "members_asked": int(stages.valid[:, i].sum())}
                       | ({"reference": refs[n_cal + i],
                           "answers": [t for t in stages.texts[:, i] if t is not None]}
                          if generation else {}))
            for i in range(len(answer))]
    atomic_write_text(run_dir / "infer_queries.jsonl", "\n".join(rows) + "\n")
    atomic_write_text(run_dir / "infer.json", json.dumps(
        {**report, "label_names": list(labels), "wall_s": time.perf_counter() - started,
         "run_config": cfg.to_dict()}, indent=1))


def _stage_means(stages: Answers, s: int, idx: np.ndarray, refs: list[str], offset: int,
                 generation: bool) -> np.ndarray:
    """(len(idx), K) the mean answer of stages 0..s on the scored queries `idx`; generated
    answers become votes first, over all stages' slots (K = stages + 1) so a confidence
    means the same at every stage."""
    upto = stages.valid[:, idx] & (np.arange(len(stages.names)) <= s)[:, None]
    if not generation:
        return mean_probs(stages.probs[:, idx], upto)
    sub = Answers(stages.names, stages.probs[:, idx], upto, stages.seconds[:, idx],
                  stages.batch_of[idx], texts=stages.texts[:, idx], conf=stages.conf[:, idx])
    generated_votes(sub, [refs[offset + i] for i in idx], 0)
    return mean_probs(sub.probs, upto)


def collect(grid: Grid, nodes: list[int], texts: list[str], label_names: tuple[str, ...],
            cfg: RunConfig, batch_offset: int = 0) -> Answers:
    """Ask every device about every batch; keep the sound answers."""
    q, k, m = len(texts), len(label_names), len(nodes)
    probs, valid = np.zeros((m, q, k)), np.zeros((m, q), dtype=bool)
    seconds = np.full((m, q), np.nan)
    generation = family(cfg).generates
    answers, conf = np.full((m, q), None, dtype=object), np.zeros((m, q))
    batch_of = np.arange(q) // cfg.infer.batch_size
    names = [f"node {n}" for n in nodes]  # + ": <member>" once the device has answered
    failed: list[tuple[int, int, str]] = []  # (member index, batch, reason)
    for b in range(int(batch_of.max()) + 1 if q else 0):
        idx = np.flatnonzero(batch_of == b)
        config = ConfigRecord({"texts": [texts[i] for i in idx],
                               "label-names": list(label_names), "batch": batch_offset + b})
        sent = unicast(nodes, MESSAGE_TYPE, lambda node: RecordDict({"config": config}))
        replies = list(grid.send_and_receive(sent, timeout=cfg.infer.timeout))
        answered = set()
        for reply in replies:
            node = origin(reply, sent)
            i = nodes.index(node)
            outcome = _read(reply, len(idx), k, generation)
            answered.add(node)
            if isinstance(outcome, str):
                failed.append((i, b, outcome))
                log.warning("infer batch %d: %s left out: %s", b, names[i], outcome)
                continue
            p, secs, member = outcome
            names[i] = f"node {node}: {member}"
            if generation:
                answers[i, idx] = p[0]
                conf[i, idx] = p[1]
            else:
                probs[i, idx] = p
            valid[i, idx] = True
            seconds[i, idx] = secs / len(idx)
        for node in set(nodes) - answered:
            i = nodes.index(node)
            failed.append((i, b, "no answer in time"))
            log.warning("infer batch %d: %s left out: no answer within infer.timeout", b,
                        names[i])
        if m > 1:
            log.info("infer batch %d/%d: %d of %d devices answered", b + 1,
                     int(batch_of.max()) + 1, int(valid[:, idx[0]].sum()), m)
    failures = [{"member": names[i], "batch": b, "reason": why} for i, b, why in failed]
    return Answers(names, probs, valid, seconds, batch_of, failures,
                   texts=answers if generation else None, conf=conf if generation else None)


def _read(reply: Message, rows: int, k: int, generation: bool = False
          ) -> tuple[object, float, str] | str:
    """(probabilities, or (texts, confidences) for generation; seconds; member name) of a
    sound answer, or why it is not."""
    if reply.has_error():
        return f"device error: {reply.error.reason}"
    try:
        got = from_record(reply.content["answers"])
        secs = float(reply.content["metrics"]["seconds"])
        member = str(reply.content["member"]["name"])
        if generation:
            return _read_generated(got, list(reply.content["texts"]["texts"]), rows), \
                secs, member
        p = np.asarray(got["probs"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as err:
        return f"malformed answer ({err.__class__.__name__}: {err})"
    if p.shape != (rows, k):
        return f"malformed answer: probabilities of shape {p.shape}, expected {(rows, k)}"
    if not np.all(np.isfinite(p)) or p.min() < 0 or not np.allclose(p.sum(axis=1), 1, atol=1e-3):
        return "malformed answer: rows are not probability distributions"
    return p, secs, member


def _read_generated(got: dict, texts: list, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(texts (rows,), confidences (rows,): exp of the mean token log-probability) from a
    generation reply; ValueError where it is malformed."""
    lp = np.asarray(got["logprobs"], dtype=np.float64)
    lengths = np.asarray(got["lengths"], dtype=np.int64)
    if len(texts) != rows or lengths.shape != (rows,) or (lengths < 0).any() \
            or lengths.sum() != len(lp):
        raise ValueError(f"{len(texts)} texts and {lengths.size} lengths summing to "
                         f"{int(lengths.sum())} for {len(lp)} log-probabilities; expected "
                         f"{rows} of each")
    if not np.all(np.isfinite(lp)) or (lp > 1e-3).any():
        raise ValueError("log-probabilities must be finite and at most 0")
    means = np.array([c.mean() if len(c) else -np.inf
                      for c in np.split(lp, np.cumsum(lengths)[:-1])])
    out = np.empty(rows, dtype=object)
    out[:] = [str(t) for t in texts]
    return out, np.exp(np.minimum(means, 0.0))


def write_results(run_dir: Path, report: dict, ans: Answers, truth: np.ndarray,
                  label_names: tuple[str, ...], wall_s: float, cfg: RunConfig,
                  references: list[str] | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    combined = report.pop("combined")
    labels = np.where(ans.valid, ans.probs.argmax(axis=2), -1)
    rows = [json.dumps({"query": qi, "label": int(truth[qi]),
                        "split": "calibration" if qi < report["calibration"] else "scored",
                        "members": {n: int(labels[i, qi]) for i, n in enumerate(ans.names)},
                        "combined": {m: int(v[qi]) for m, v in combined.items()}}
                       | ({"reference": references[qi],
                           "answers": {n: ans.texts[i, qi] for i, n in enumerate(ans.names)}}
                          if ans.texts is not None and references else {}))
            for qi in range(len(truth))]
    atomic_write_text(run_dir / "infer_queries.jsonl", "\n".join(rows) + "\n")
    atomic_write_text(run_dir / "infer.json", json.dumps(
        {**report, "label_names": list(label_names), "wall_s": wall_s,
         "run_config": cfg.to_dict()}, indent=1))
    write_plots(run_dir / "plots", report, ans.names)


def write_plots(out: Path, report: dict, names: list[str]) -> None:
    """infer_cascade.png (accuracy vs seconds per query) and infer_trust.png into `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    curve, chosen = report["cascade"]["curve"], report["cascade"]["chosen"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([c["seconds_per_query"] for c in curve], [c["accuracy"] for c in curve], "o-",
            ms=3, label="cascade, one point per threshold")
    ax.plot([chosen["seconds_per_query"]], [chosen["accuracy"]], "r*", ms=12,
            label=f"chosen (threshold {chosen['threshold']:.2f})")
    for m in report["members"]:
        ax.plot([m["seconds_per_query"]], [m["accuracy"]], "s", label=m["member"])
    ax.set(xlabel="seconds per query", ylabel="accuracy (scored queries)",
           title="Cascade: accuracy vs cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out / "infer_cascade.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    trust = np.asarray(report["trust"])
    for i, name in enumerate(names):
        ax.plot(range(len(trust)), trust[:, i], label=name)
    ax.set(xlabel="batches answered", ylabel="trust t_i", title="Trust in each member")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out / "infer_trust.png")


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
