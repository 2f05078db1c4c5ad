"""What a collaborative-inference job measured, from the members' collected answers: pure
numpy over (M, Q, K) arrays, so benchmarks and tests call it without Flower.

The first `calibration` queries give each member's quality q_i and the cascade's threshold;
every accuracy reported is on the other queries. Trust-weighted consensus runs batch by batch
in the order the queries were asked: a batch's consensus uses the trust earned before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from server_app.infer.combine import (accuracy, agreement, candidate_votes, cascade, confidence,
                                      geometric_probs, log_odds_weights, majority_vote,
                                      mean_probs, trust_update, trust_weights, weighted_vote)
from edge_lam.serving.generation import answer_key, has_final_numbers


@dataclass
class Answers:
    """Every member's answers to every query. `seconds` is (M, Q): the member's batch time
    shared over the batch's queries (NaN where it did not answer)."""

    names: list[str]
    probs: np.ndarray  # (M, Q, K)
    valid: np.ndarray  # (M, Q) bool
    seconds: np.ndarray  # (M, Q)
    batch_of: np.ndarray  # (Q,) which batch each query was asked in
    failures: list[dict] = field(default_factory=list)  # {member, batch, reason}
    texts: np.ndarray | None = None  # (M, Q) generated answers (object; None: not answered)
    conf: np.ndarray | None = None  # (M, Q) exp(mean token log-probability) of each
    classes: int | None = None  # how many answers a guesser faces (log-odds), else K


def generated_votes(ans: Answers, references: list[str], calibration: int) -> np.ndarray:
    """Generated answers as votes: fills `ans.probs` (`candidate_votes` on each answer's key:
    its final number when the references are GSM8K-style, else its normalised text) and
    `ans.classes` (the distinct reference answers among the calibration queries: the chance
    level of the log-odds weights); returns the (Q,) truth (-1: nobody gave the reference)."""
    numeric = has_final_numbers(references)
    keys = [[answer_key(t, numeric) if ok else None for t, ok in zip(row, valid)]
            for row, valid in zip(ans.texts, ans.valid)]
    ref = [answer_key(r, numeric) for r in references]
    ans.probs, truth = candidate_votes(keys, ans.conf, ans.valid, ref)
    ans.classes = max(2, len(set(ref[:max(calibration, 1)])))
    return truth


@dataclass(frozen=True)
class Knobs:
    calibration: int
    alpha: float = 0.5
    beta: float = 0.5
    trust_rate: float = 0.3
    confidence: str = "max"
    cascade_loss: float = 0.01


def summarise(ans: Answers, truth: np.ndarray, knobs: Knobs) -> dict:
    """Per member and per method: accuracy on the non-calibration queries and mean seconds
    per query; the trust history; the cascade's curve and chosen threshold."""
    q = len(truth)
    calib = np.arange(q) < min(knobs.calibration, q - 1)  # keep at least one query to score
    rest = ~calib
    labels = np.where(ans.valid, ans.probs.argmax(axis=2), -1)  # (M, Q)
    quality = np.array([accuracy(labels[i][calib], truth[calib]) for i in range(len(labels))])
    per_query_cost = np.nan_to_num(ans.seconds).sum(axis=0)  # asking everyone
    members = [{"member": n, "accuracy": accuracy(labels[i][rest], truth[rest]),
                "calibration_accuracy": float(quality[i]),
                "seconds_per_query": float(np.nanmean(ans.seconds[i])) if ans.valid[i].any()
                else float("nan"), "answered": int(ans.valid[i].sum()),
                "failed_batches": sum(f["member"] == n for f in ans.failures)}
               for i, n in enumerate(ans.names)]
    trust_labels, history = _trust_consensus(ans, quality, knobs)
    combined = {
        "majority vote": majority_vote(ans.probs, ans.valid),
        "weighted vote (q_i)": weighted_vote(ans.probs, ans.valid, quality),
        "log-odds weighted vote": weighted_vote(ans.probs, ans.valid,
                                                log_odds_weights(quality, ans.classes or
                                                                 ans.probs.shape[2])),
        "mean probabilities": mean_probs(ans.probs, ans.valid).argmax(axis=1),
        "geometric mean probabilities": geometric_probs(ans.probs, ans.valid).argmax(axis=1),
        "trust-weighted consensus": trust_labels,
    }
    methods = [{"method": m, "accuracy": accuracy(v[rest], truth[rest]),
                "seconds_per_query": float(per_query_cost[rest].mean())}
               for m, v in combined.items()]
    return {"queries": int(q), "calibration": int(calib.sum()), "members": members,
            "methods": methods, "trust": history,
            "cascade": _cascade_report(ans, truth, calib, knobs, quality),
            "failures": ans.failures, "combined": {k: v.tolist() for k, v in combined.items()}}


def _trust_consensus(ans: Answers, quality: np.ndarray, knobs: Knobs
                     ) -> tuple[np.ndarray, list[list[float]]]:
    """Batch by batch: w_i = alpha q_i + beta t_i, consensus = weighted vote, then t_i moves
    toward member i's agreement with it. Returns the labels and t after each batch."""
    trust = np.ones(len(ans.names))
    out = np.full(ans.probs.shape[1], -1)
    history = [trust.tolist()]
    for b in np.unique(ans.batch_of):
        idx = np.flatnonzero(ans.batch_of == b)
        w = trust_weights(quality, trust, knobs.alpha, knobs.beta)
        out[idx] = weighted_vote(ans.probs[:, idx], ans.valid[:, idx], w)
        trust = trust_update(trust, _agreement_with_others(ans.probs[:, idx],
                                                           ans.valid[:, idx], w),
                             knobs.trust_rate)
        history.append(trust.tolist())
    return out, history


def _thresholds(conf: np.ndarray) -> np.ndarray:
    """Candidate thresholds: below every confidence (never escalate), 41 quantiles, and above
    every confidence (always escalate: everyone answers)."""
    return np.unique(np.concatenate([[conf.min() - 1.0], np.quantile(conf, np.linspace(0, 1, 41)),
                                     [conf.max() + 1.0]]))


def cheapest_first(seconds: np.ndarray, quality: np.ndarray | None = None) -> np.ndarray:
    """Member indices by mean seconds per query, members within 10% of each other's cost
    counted as equally cheap and then taken best first (calibration quality); a member that
    never answered comes last."""
    cost = np.array([np.nanmean(s) if np.isfinite(s).any() else np.inf for s in seconds])
    bucket = np.where(np.isfinite(cost), np.floor(np.log(np.maximum(cost, 1e-12)) /
                                                  np.log(1.1)), np.inf)
    q = np.zeros(len(cost)) if quality is None else -np.asarray(quality, dtype=float)
    return np.lexsort((q, bucket))


def _agreement_with_others(probs: np.ndarray, valid: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(M,) member i's agreement with the weighted vote of the others (leave-one-out), over
    the queries some other member answered: a member cannot earn trust by agreeing with a
    consensus its own vote tipped."""
    out = np.full(len(w), np.nan)
    for i in range(len(w)):
        others = valid.copy()
        others[i] = False
        seen = others.any(axis=0)
        out[i] = agreement(probs[i:i + 1, seen], valid[i:i + 1, seen],
                           weighted_vote(probs[:, seen], others[:, seen], w))[0]
    return out


def _plan(ans: Answers, truth: np.ndarray, calib: np.ndarray, knobs: Knobs,
          quality: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, list[dict], dict]:
    """(order, costs (S, Q), curve over the thresholds, chosen point). Stage s is the mean
    of the s + 1 cheapest members (`cheapest_first`), the last stage is everyone. One
    threshold for every stage; the chosen one is the cheapest on the `calib` queries whose
    accuracy there is within `cascade_loss` of everyone's; each curve point also scores the
    other queries, where there are any."""
    order = cheapest_first(ans.seconds, quality)
    stages = [mean_probs(ans.probs[order[:s + 1]], ans.valid[order[:s + 1]])
              for s in range(len(order))]  # a query no stage member answered: all zeros
    costs = np.nan_to_num(ans.seconds[order], nan=0.0)  # (S, Q): stage s adds member s
    conf = np.concatenate([confidence(p, knobs.confidence) for p in stages[:-1]] or [[0.0]])
    scored = ~calib
    curve = []
    for tau in _thresholds(conf):
        labels, by, cost = cascade(stages, [tau] * (len(stages) - 1), costs, knobs.confidence)
        point = {"threshold": float(tau),
                 "calibration_accuracy": accuracy(labels[calib], truth[calib]),
                 "calibration_seconds": float(cost[calib].mean())}
        if scored.any():
            point |= {"accuracy": accuracy(labels[scored], truth[scored]),
                      "seconds_per_query": float(cost[scored].mean()),
                      "escalated": float((by[scored] > 0).mean())}
        curve.append(point)
    target = curve[-1]["calibration_accuracy"] - knobs.cascade_loss  # the last: everyone
    ok = [c for c in curve if c["calibration_accuracy"] >= target - 1e-12]
    chosen = min(ok, key=lambda c: (c["calibration_seconds"], -c["calibration_accuracy"]))
    return order, costs, curve, chosen


def _cascade_report(ans: Answers, truth: np.ndarray, calib: np.ndarray, knobs: Knobs,
                    quality: np.ndarray | None = None) -> dict:
    """The cascade (`_plan`) reported on the non-calibration queries, against asking
    everyone and against the costliest member alone."""
    order, costs, curve, chosen = _plan(ans, truth, calib, knobs, quality)
    everyone = curve[-1]  # the highest threshold: every query asks every member
    costliest = order[-1]
    its_labels = np.where(ans.valid[costliest], ans.probs[costliest].argmax(axis=1), -1)
    alone = {"member": ans.names[costliest],
             "accuracy": accuracy(its_labels[~calib], truth[~calib]),
             "seconds_per_query": float(costs[-1][~calib].mean())}
    saved = 1 - chosen["seconds_per_query"] / everyone["seconds_per_query"] \
        if everyone["seconds_per_query"] > 0 else float("nan")
    return {"order": [ans.names[i] for i in order], "curve": curve, "chosen": chosen,
            "everyone": everyone, "costliest_alone": alone, "saved_share": saved}


def choose_cascade(ans: Answers, truth: np.ndarray, knobs: Knobs) -> dict:
    """For a live cascade (`infer.method='cascade'`), from the calibration queries that every
    member answered: the order, the threshold, and what asking everyone costs and scores."""
    quality = np.array([accuracy(np.where(ans.valid[i], ans.probs[i].argmax(axis=1), -1),
                                 truth) for i in range(len(ans.names))])
    order, _, curve, chosen = _plan(ans, truth, np.ones(len(truth), dtype=bool), knobs,
                                    quality)
    return {"order": [int(i) for i in order], "threshold": chosen["threshold"],
            "calibration_seconds": chosen["calibration_seconds"],
            "calibration_accuracy": chosen["calibration_accuracy"],
            "everyone_accuracy": curve[-1]["calibration_accuracy"],
            "everyone_seconds": curve[-1]["calibration_seconds"]}
