"""S6 on the server, one round at a time: robust aggregation of the replies' product updates,
each device's leave-one-out contribution, and the weights that follow from both.

`RobustRound.aggregate` is what the wrapper of the strategy's aggregation
(`strategies.robust.wrapper.RobustAggregation`) calls in its place when `robust.aggregator`
is not `none` or `robust.contribution` re-weights (`drop-harmful`, `softmax`); with
`robust.contribution='report'` and no robust aggregator the wrapped aggregation stays and only
the contributions are added to the round's row.

The contribution model is linear in product space (`strategies.robust.contribution`):
theta_new = theta + sum_k w_k Delta_k with w the aggregator's weights (example counts for
`none` / `mean`, the robust statistic's per-device shares otherwise), theta_-k the same
without device k (weights renormalised). The estimate is S6's first-order influence with a
diagonal empirical Fisher, from one pass of per-example gradients on the server's validation
set; `robust.exact-loo` also evaluates every theta_-k (K + 1 loss passes) to check it.
Re-weighting: w' = alpha q + (1 - alpha) t, q = `contribution_weights(c, w, mode)`, t = w
(the aggregator's trust), and the aggregate becomes sum_k w'_k Delta_k.

The server's own data (FLTrust's root set, the validation set) are disjoint seeded samples
of the training split: `robust.root-examples` and `robust.contribution-examples` rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from strategies.robust.contribution import (compose_with_trust, contribution_weights,
                                            influence_contributions,
                                            loo_directions, spearman)
from strategies.robust.influence import ProductSpace, timed
from strategies.robust.math import (ROBUST_AGGREGATORS, RobustResult, RobustRule, Updates,
                                    finish, unstack, update_of)
from strategies.lora.math import example_weights
from edge_lam.config.run_config import RunConfig
from edge_lam.data.text import Examples
from edge_lam.training.lora import State
from edge_lam.logs import get_logger
from edge_lam.config.options import ConfigError

log = get_logger()

# the empirical Fisher's quadratic forms need the K x D LOO directions at once
EMPIRICAL_FISHER_BYTES = 2 << 30


def robust_rule(cfg: RunConfig) -> RobustRule | None:
    """The registered rule `robust.aggregator` names (None: `none`, the strategy's own)."""
    name = cfg.robust.aggregator
    return None if name == "none" else ROBUST_AGGREGATORS.get(name)


def robust_active(cfg: RunConfig) -> bool:
    """Does S6 replace the strategy's own aggregation?"""
    return robust_rule(cfg) is not None or cfg.robust.contribution in ("drop-harmful",
                                                                         "softmax")


def s6_active(cfg: RunConfig) -> bool:
    return robust_rule(cfg) is not None or cfg.robust.contribution != "off"


@dataclass
class RobustRound:
    """The server's S6 state: its root and validation sets, and each device's trust."""

    cfg: RunConfig
    label_names: tuple[str, ...]
    trust: dict[int, float] = field(default_factory=dict)  # node -> last weight x K
    _root: Examples | None = None
    _valid: Examples | None = None
    _space: ProductSpace | None = None

    # ----------------------------------------------------------------- the server's data
    def _server_sets(self) -> tuple[Examples, Examples]:
        """(root set, validation set): disjoint seeded samples of the training split."""
        if self._root is None:
            from edge_lam.training.device import DeviceInfo, local_examples

            every = local_examples(self.cfg, DeviceInfo(), self.label_names)
            r = self.cfg.robust
            need = r.root_examples + r.contribution_examples
            if need > len(every):
                raise ConfigError(f"robust.root-examples + robust.contribution-examples = "
                                  f"{need} > the {len(every)} training examples: lower them")
            order = np.random.default_rng([self.cfg.seed, 1717]).permutation(len(every))
            self._root = every.subset(sorted(order[:r.root_examples].tolist()))
            self._valid = every.subset(sorted(order[r.root_examples:need].tolist()))
        return self._root, self._valid

    def root_update(self, previous: State, server_round: int) -> dict[str, np.ndarray]:
        """FLTrust's g0: the update the server trains on its root set from the global state
        (train.local-steps steps at r_max, seeded by the round)."""
        from edge_lam.training.device import DeviceInfo, train_round

        root, _ = self._server_sets()
        trained, _, metrics = train_round(self.cfg, DeviceInfo(), self.label_names,
                                          self.cfg.r_max, previous, server_round,
                                          tag=f"[round {server_round}] server root set:",
                                          examples=root, r_max=self.cfg.r_max)
        log.info("round %d: FLTrust root update from %d examples (loss %.4f)", server_round,
                 len(root), metrics["train_loss"])
        return update_of(previous, trained)

    def space(self) -> ProductSpace:
        if self._space is None:
            self._space = ProductSpace(self.cfg, self.label_names, self._server_sets()[1])
        return self._space

    # ----------------------------------------------------------------- one round
    def aggregate(self, server_round: int, previous: State, sent: Sequence[State],
                  states: Sequence[State], counts: Sequence[int], nodes: Sequence[int]
                  ) -> tuple[State | None, dict]:
        """(new global state or None if the strategy keeps its own, the round's `robust` /
        `contribution` entries for metrics.jsonl)."""
        r = self.cfg.robust
        info: dict = {}
        result = None
        # trust from the rounds before this one (read before this round overwrites it)
        self._trust_before = {int(n): float(self.trust.get(int(n), 1.0)) for n in nodes}
        rule = robust_rule(self.cfg)
        if rule is not None:
            result = self._robust(rule, server_round, previous, sent, states, counts)
            info["robust"] = self._describe(server_round, result, nodes)
        if r.contribution == "off":
            return (result.state if result else None), info
        updates = Updates(sent, states)
        weights = result.weights if result is not None else example_weights(counts)
        contribution, new_weights = self._contributions(previous, updates, weights, nodes)
        info["contribution"] = contribution
        if new_weights is None:  # report only
            return (result.state if result else None), info
        entry = info.setdefault("robust", {"aggregator": "none", "refused": 0, "altered": 0,
                                           "refusals": []})
        reasons: list[str | None] = []
        for node, w, old_w, c in zip(nodes, new_weights, weights,
                                     contribution["estimate"].values()):
            reason = None
            if w == 0 < old_w:
                reason = f"contribution {c:.4g} <= 0: dropped"
            elif not np.isclose(w, old_w):
                reason = f"contribution {c:.4g}: weight {old_w:.3g} -> {w:.3g}"
            reasons.append(reason)
            if reason:
                log.warning("round %d: node %d re-weighted by robust.contribution=%s: %s",
                            server_round, node, self.cfg.robust.contribution, reason)
                entry["refusals"].append({"node_id": int(node), "refused": bool(w == 0),
                                          "reason": reason})
        entry["dropped"] = int(sum(1 for w, o in zip(new_weights, weights) if w == 0 < o))
        entry["contribution_weights"] = {str(n): float(w) for n, w in zip(nodes, new_weights)}
        accepted = (result.accepted if result is not None else np.ones(len(nodes), bool)) \
            & (new_weights > 0)
        final = finish(previous, updates.combine(new_weights), new_weights, accepted, reasons,
                       self.cfg.r_max)
        self._remember(nodes, new_weights)
        return final.state, info

    def _robust(self, rule: RobustRule, server_round: int, previous: State, sent, states,
                counts) -> RobustResult:
        """The rule's statistic, with its `robust.*` parameters (and FLTrust's root update
        when it `needs_root_update`)."""
        params = dict(getattr(rule, "params", lambda robust: {})(self.cfg.robust))
        if getattr(rule, "needs_root_update", False):
            params["root_update"] = self.root_update(previous, server_round)
        return rule(previous, sent, states, counts, self.cfg.r_max, **params)

    def _describe(self, server_round: int, result: RobustResult, nodes: Sequence[int]
                  ) -> dict:
        """The round's `robust` entry; every refusal and alteration logged with its node."""
        refusals = []
        for node, ok, reason in zip(nodes, result.accepted, result.reasons):
            if reason is None:
                continue
            log.warning("round %d: node %d %s by robust.aggregator=%s: %s", server_round,
                        node, "altered" if ok else "refused", self.cfg.robust.aggregator,
                        reason)
            refusals.append({"node_id": int(node), "refused": not bool(ok), "reason": reason})
        self._remember(nodes, result.weights)
        return {"aggregator": self.cfg.robust.aggregator,
                "refused": int((~result.accepted).sum()),
                "altered": sum(1 for x in refusals if not x["refused"]),
                "weights": {str(n): float(w) for n, w in zip(nodes, result.weights)},
                "refusals": refusals,
                "svd_error": max(result.svd_error.values(), default=0.0)}

    def _remember(self, nodes: Sequence[int], weights: np.ndarray) -> None:
        """trust[node]: its last weight x K (1 = an equal share)."""
        for node, w in zip(nodes, weights):
            self.trust[int(node)] = float(w) * len(nodes)

    def _contributions(self, previous: State, updates: Updates, weights: np.ndarray,
                       nodes: Sequence[int]) -> tuple[dict, np.ndarray | None]:
        """S6 estimate (and exact LOO with robust.exact-loo) per node; the new weights when
        robust.contribution re-weights (None: report only)."""
        w = np.asarray(weights, dtype=np.float64)
        out: dict = {"estimate": {}, "weights": {str(n): float(x) for n, x in zip(nodes, w)}}
        if (w < 1.0 - 1e-12).sum() < 2 or (w > 0).sum() < 2:
            out["skipped"] = "fewer than two devices with a weight in the aggregate: no " \
                             "leave-one-out model"
            out["estimate"] = {str(n): 0.0 for n in nodes}
            return out, None
        estimate, variants, losses = self._estimate(previous, updates, w, nodes, out)
        if self.cfg.robust.exact_loo:
            self._check_exact(previous, updates, w, nodes, losses, estimate, variants, out)
        return out, self._reweighted(estimate, w, nodes)

    def _estimate(self, previous: State, updates: Updates, w: np.ndarray,
                  nodes: Sequence[int], out: dict) -> tuple[np.ndarray, dict, np.ndarray]:
        """(the estimate, every variant of it, the validation losses), recorded in `out`.
        Block by block: the LOO directions and both terms of the estimate are sums over
        coordinates."""
        r = self.cfg.robust
        space = self.space()
        empirical = r.fisher == "empirical" and \
            len(w) * updates.size * 8 <= EMPIRICAL_FISHER_BYTES
        directions = np.concatenate([loo_directions(block, w) for _, _, block in
                                     updates.blocks()], axis=1) if empirical else None
        grads, estimate_s = timed(space.gradients, previous, updates.combine(w), updates.keys,
                                  directions)
        # g^T d_k (+ 1/2 d_k^T diag(F) d_k): from the directions already formed, or block by
        # block (both terms are sums over coordinates; one block's directions at a time)
        pieces = [(directions, grads.mean, grads.fisher_diag)] if empirical else (
            (loo_directions(block, w), g.ravel(), f.ravel()) for (_, _, block), g, f in zip(
                updates.blocks(), unstack(grads.mean, updates.keys, updates.shapes).values(),
                unstack(grads.fisher_diag, updates.keys, updates.shapes).values()))
        first, diagonal = np.zeros(len(w)), np.zeros(len(w))
        for d, g, f in pieces:
            first += influence_contributions(g, None, d)
            diagonal += influence_contributions(g, f, d)
        del directions, pieces
        variants = {"first_order": first, "diagonal_fisher": diagonal}
        if grads.fisher_form is not None:
            variants["empirical_fisher"] = first + 0.5 * grads.fisher_form
        elif r.fisher == "empirical":
            out["fisher_note"] = (f"the {len(w)} x {updates.size} LOO directions exceed "
                                  f"{EMPIRICAL_FISHER_BYTES >> 30} GiB: diagonal Fisher used")
        estimate = variants.get("empirical_fisher", diagonal)
        out["fisher"] = "empirical" if "empirical_fisher" in variants else "diagonal"
        out["estimate"] = {str(n): float(c) for n, c in zip(nodes, estimate)}
        for name, values in variants.items():
            out[name] = {str(n): float(c) for n, c in zip(nodes, values)}
        out["val_loss"] = float(grads.losses.mean())
        out["estimate_s"] = estimate_s
        out["validation_examples"] = len(grads.losses)
        return estimate, variants, grads.losses

    def _check_exact(self, previous: State, updates: Updates, w: np.ndarray,
                     nodes: Sequence[int], losses: np.ndarray, estimate: np.ndarray,
                     variants: dict, out: dict) -> None:
        """robust.exact-loo: every true LOO change and its rank correlation with the
        estimates, recorded in `out`."""
        exact, exact_s = timed(self._exact, previous, updates, w, float(losses.mean()))
        out["exact"] = {str(n): float(c) for n, c in zip(nodes, exact)}
        out["exact_s"] = exact_s
        if np.ptp(exact) > 0 and np.ptp(estimate) > 0:
            out["spearman"] = spearman(estimate, exact)
            out["spearman_by_estimate"] = {
                name: spearman(values, exact) for name, values in variants.items()
                if np.ptp(values) > 0}

    def _reweighted(self, estimate: np.ndarray, w: np.ndarray, nodes: Sequence[int] = ()
                    ) -> np.ndarray | None:
        """The weights robust.contribution gives (None: report only): w' = alpha q +
        (1 - alpha) t, q from the contributions, t = this round's aggregator weights times
        each device's trust from the rounds before (its last weight x K: 0 for a device the
        aggregator refused last time, 1 for an equal share or a device not seen yet; a
        resumed run restores it)."""
        r = self.cfg.robust
        if r.contribution == "report":
            return None
        if r.contribution == "drop-harmful" and not (estimate > 0).any():
            log.warning("every device's contribution is <= 0 this round: keeping the "
                        "aggregator's weights")
            q = w
        else:
            q = contribution_weights(estimate, w, r.contribution, r.contribution_temperature)
        if r.trust_alpha == 1.0:
            return q
        before = getattr(self, "_trust_before", {})
        t = w * np.array([before.get(int(n), 1.0) for n in nodes]) if len(nodes) else w
        if t.sum() <= 0:  # every device distrusted: this round's weights alone
            t = w
        return compose_with_trust(q, t, r.trust_alpha, 1.0 - r.trust_alpha)

    def _exact(self, previous: State, updates: Updates, w: np.ndarray, base: float
               ) -> np.ndarray:
        """True LOO: L(theta_-k) - L(theta_new) for every k (a device with weight 0 has the
        same model: 0)."""
        space = self.space()
        out = np.zeros(len(w))
        for k in range(len(w)):
            if w[k] == 0:
                continue
            wk = w.copy()
            wk[k] = 0.0
            out[k] = space.loss(previous, updates.combine(wk / (1.0 - w[k]))) - base
        return out
