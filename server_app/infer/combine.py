"""How several members' answers become one (S8 multi-LLM ensembles, S6 trust): pure functions.

Shapes: M members, Q queries, K classes. `probs` is (M, Q, K), each member's label
probabilities; `valid` is (M, Q) bool, False where a member failed, timed out or replied
malformed: such an answer counts nowhere. `weights` is (M,). A query no member answered
gets label -1.

- `majority_vote`, `weighted_vote`: each member's top label counts 1 (or w_i); ties go to
  the lowest label id; a query where every member that answered weighs 0 falls back to
  one vote each.
- `mean_probs` (arithmetic), `geometric_probs` (normalised exp of the weighted mean log):
  weighted averages of the distributions over the members that answered.
- `log_odds_weights`: w_i = log(q_i (K - 1) / (1 - q_i)), the optimal weights of a weighted
  majority of independent voters of accuracy q_i over K labels (Nitzan & Paroush 1982; for
  K = 2 the classic log-odds rule), zero at or below chance: a weak member cannot outvote a
  strong one by numbers.
- `trust_update`: t_i <- (1 - rate) t_i + rate a_i, a_i the share of this batch where member
  i agreed with the consensus (S6: a member answering at random or adversarially loses
  weight batch after batch).
- `trust_weights`: w_i = alpha q_i + beta t_i, q_i the member's accuracy on the calibration
  queries.
- `confidence`: max probability, margin (top-1 minus top-2) or negative entropy.
- `candidate_votes`: generated answers as distributions over each query's candidate
  answers, so every function here combines them too: member i puts its sequence
  confidence c_i = exp(mean token log-probability) on its own answer and spreads 1 - c_i
  evenly over the K - 1 other slots (K = M + 1: at most M distinct answers, and a slot
  nobody gave). Mean probabilities then is a confidence-weighted vote.
- `cascade`: members asked cheapest first; a query stops at the first stage whose confidence
  reaches that stage's threshold (the last stage always answers).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CONFIDENCES = ("max", "margin", "entropy")


def _labels(probs: np.ndarray) -> np.ndarray:
    return probs.argmax(axis=-1)


def weighted_vote(probs: np.ndarray, valid: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(Q,) the label with the largest sum of the weights of the members that chose it."""
    m, q, k = probs.shape
    votes = np.zeros((q, k))
    chosen = _labels(probs)  # (M, Q)
    w = np.where(valid, np.asarray(weights, dtype=np.float64)[:, None], 0.0)  # (M, Q)
    w[:, w.sum(axis=0) <= 0] = 1.0  # nobody who answered weighs anything: one vote each
    for i in range(m):
        np.add.at(votes, (np.arange(q)[valid[i]], chosen[i][valid[i]]), w[i][valid[i]])
    out = votes.argmax(axis=1)  # ties: the lowest label id
    out[~valid.any(axis=0)] = -1
    return out


def majority_vote(probs: np.ndarray, valid: np.ndarray) -> np.ndarray:
    return weighted_vote(probs, valid, np.ones(probs.shape[0]))


def mean_probs(probs: np.ndarray, valid: np.ndarray, weights: np.ndarray | None = None
               ) -> np.ndarray:
    """(Q, K) sum_i w_i p_i / sum_i w_i over the members that answered each query."""
    w = _masked_weights(probs, valid, weights)  # (M, Q)
    return np.einsum("mq,mqk->qk", w, probs)


def geometric_probs(probs: np.ndarray, valid: np.ndarray, weights: np.ndarray | None = None,
                    floor: float = 1e-12) -> np.ndarray:
    """(Q, K) exp(sum_i w_i log p_i), renormalised: a class any member rules out stays low."""
    w = _masked_weights(probs, valid, weights)
    log = np.einsum("mq,mqk->qk", w, np.log(np.maximum(probs, floor)))
    out = np.exp(log - log.max(axis=1, keepdims=True))
    return out / out.sum(axis=1, keepdims=True)


def _masked_weights(probs: np.ndarray, valid: np.ndarray, weights: np.ndarray | None
                    ) -> np.ndarray:
    """(M, Q) weights of the members that answered each query, summing to 1 per query (a
    query nobody answered gets all zeros)."""
    m = probs.shape[0]
    w = np.ones(m) if weights is None else np.asarray(weights, dtype=np.float64)
    per = np.where(valid, w[:, None], 0.0)
    total = per.sum(axis=0, keepdims=True)
    return np.divide(per, total, out=np.zeros_like(per), where=total > 0)


def log_odds_weights(quality: np.ndarray, k: int, eps: float = 1e-3) -> np.ndarray:
    """w_i = max(0, log(q_i (K - 1) / (1 - q_i))), q_i clipped to [eps, 1 - eps]."""
    q = np.clip(np.asarray(quality, dtype=np.float64), eps, 1 - eps)
    return np.maximum(0.0, np.log(q * (k - 1) / (1 - q)))


def agreement(probs: np.ndarray, valid: np.ndarray, consensus: np.ndarray) -> np.ndarray:
    """(M,) share of the queries each member answered where its label is the consensus
    (NaN for a member that answered none)."""
    same = (_labels(probs) == consensus[None, :]) & valid
    answered = valid.sum(axis=1)
    return np.divide(same.sum(axis=1), answered, out=np.full(len(answered), np.nan),
                     where=answered > 0)


def trust_update(trust: np.ndarray, agree: np.ndarray, rate: float) -> np.ndarray:
    """t_i <- (1 - rate) t_i + rate a_i; a member that answered nothing keeps its trust."""
    return np.where(np.isnan(agree), trust, (1 - rate) * trust + rate * np.nan_to_num(agree))


def trust_weights(quality: np.ndarray, trust: np.ndarray, alpha: float, beta: float
                  ) -> np.ndarray:
    """w_i = alpha q_i + beta t_i."""
    return alpha * np.asarray(quality) + beta * np.asarray(trust)


def confidence(probs: np.ndarray, kind: str = "max") -> np.ndarray:
    """(..., K) -> (...): how sure a distribution is; larger is surer for every kind."""
    if kind == "max":
        return probs.max(axis=-1)
    if kind == "margin":
        top2 = np.sort(probs, axis=-1)[..., -2:]
        return top2[..., 1] - top2[..., 0]
    if kind == "entropy":
        p = np.maximum(probs, 1e-12)
        return (p * np.log(p)).sum(axis=-1)  # minus the entropy
    raise ValueError(f"confidence kind '{kind}': use one of {', '.join(CONFIDENCES)}")


def cascade(stages: Sequence[np.ndarray], thresholds: Sequence[float], costs: np.ndarray,
            kind: str = "max") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ask stage 0 first; escalate a query to stage s + 1 while stage s's confidence is below
    thresholds[s] (len(stages) - 1 thresholds; the last stage always answers).

    `stages[s]` is (Q, K) probabilities (a member, or an ensemble of several); `costs` is
    (S, Q), what asking stage s about query q costs (seconds, say). Returns (labels (Q,),
    stage that answered (Q,), cost paid per query (Q,): every stage asked, not only the
    last)."""
    q = stages[0].shape[0]
    answered_by = np.full(q, len(stages) - 1)
    open_ = np.ones(q, dtype=bool)
    for s, threshold in enumerate(thresholds):
        done = open_ & (confidence(stages[s], kind) >= threshold)
        answered_by[done] = s
        open_ &= ~done
    labels = np.stack([_labels(p) for p in stages])[answered_by, np.arange(q)]
    asked = np.arange(len(stages))[:, None] <= answered_by[None, :]  # (S, Q)
    return labels, answered_by, (np.asarray(costs) * asked).sum(axis=0)


def candidate_votes(keys: Sequence[Sequence[str | None]], conf: np.ndarray, valid: np.ndarray,
                    reference: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """Generated answers as (M, Q, K) distributions over each query's candidates, K = M + 1,
    and the (Q,) index of the reference's candidate (-1 where no member gave it).

    `keys[i][q]` is member i's answer key (its final number, say; None: it gave none, a
    candidate of its own that is never right), `conf` (M, Q) its confidence in [0, 1],
    clipped to at least 1/K + 1e-6 so a member's top slot is its own answer. Candidates are
    numbered in member order; an invalid answer is no candidate and its row is uniform."""
    m, q = np.asarray(valid).shape
    k = m + 1
    probs = np.full((m, q, k), 1.0 / k)
    truth = np.full(q, -1)
    for j in range(q):
        slots: dict = {}
        for i in range(m):
            if not valid[i, j]:
                continue
            key = keys[i][j]
            slot = slots.setdefault(("none", i) if key is None else key, len(slots))
            c = float(np.clip(conf[i, j], 1.0 / k + 1e-6, 1.0))
            probs[i, j] = (1 - c) / (k - 1)
            probs[i, j, slot] = c
        if reference[j] is not None and reference[j] in slots:
            truth[j] = slots[reference[j]]
    return probs, truth


def accuracy(labels: np.ndarray, truth: np.ndarray) -> float:
    """Share of right answers; no answer (-1) is never right, even where no member gave the
    right answer (truth -1)."""
    labels = np.asarray(labels)
    return float(np.mean((labels == np.asarray(truth)) & (labels >= 0))) if len(truth) \
        else float("nan")
