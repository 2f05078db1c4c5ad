"""The differential-privacy budget stop, on the server: a device that replies
`budget-exhausted` (its dp.target-epsilon is spent, `edge_lam.training.privacy`) is logged and not asked
again. Its set of exhausted devices is a checkpoint part (`strategies.lora.resume`)."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message

from strategies.lora.resume import NodeTable
from edge_lam.logs import get_logger

log = get_logger()


def has_payload(msg: Message) -> bool:
    """Does a reply carry something to aggregate (trained arrays or gradients)?"""
    return "arrays" in msg.content or "gradient" in msg.content


def privacy_spent(metrics: dict) -> dict:
    """A DP device's row entries in metrics.jsonl (none without dp.enabled)."""
    if "epsilon" not in metrics:
        return {}
    return {"epsilon": float(metrics["epsilon"]), "private_steps": int(metrics["private-steps"]),
            "budget_exhausted": bool(metrics.get("budget-exhausted", 0))}


class PrivacyBudget:
    """Which devices stopped, and the epsilon each had spent then."""

    def __init__(self, target_epsilon: float):
        self.target_epsilon = target_epsilon
        self.exhausted = NodeTable("exhausted", float)  # node -> epsilon spent when it stopped

    def available(self, nodes: Iterable[int]) -> list[int]:
        """`nodes` less those whose budget is spent."""
        return [n for n in nodes if n not in self.exhausted]

    def stopped(self, server_round: int, msg: Message, node: int) -> bool:
        """Did the device say its privacy budget is spent? (logged; it is not asked again)"""
        if msg.has_error() or "metrics" not in msg.content:
            return False
        metrics = msg.content["metrics"]
        if not int(metrics.get("budget-exhausted", 0)):
            return False
        self.exhausted[node] = float(metrics.get("epsilon", float("nan")))
        log.warning("round %d: node %d stopped: privacy budget exhausted (epsilon %.3f of "
                    "dp.target-epsilon=%g)%s", server_round, node, self.exhausted[node],
                    self.target_epsilon,
                    "" if has_payload(msg) else "; nothing to aggregate from it")
        return True
