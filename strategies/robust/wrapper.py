"""S6 as a wrapper of the strategy's aggregation, as Flower wraps a strategy for differential
privacy (`flwr.serverapp.strategy.DifferentialPrivacyServerSideFixedClipping`): the strategy
validates replies as ever and hands the accepted ones to its aggregation; with `robust.*` on,
`wrap_robust` puts `RobustAggregation` around that aggregation, which takes it over (the
robust statistic and the contributions on products, `aggregate.RobustRound`) and leaves it
to the wrapped one only where S6 keeps it (`robust.contribution='report'` alone).

An aggregation is anything with `aggregate(server_round, start, sent, states, counts, nodes)
-> (new global state, the round's extra metrics.jsonl entries)` and `overridden` (does the
strategy aggregate its own way?); see `strategies.lora.strategy.OwnAggregation`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from strategies.lora.resume import NodeTable, Restored
from strategies.robust.aggregate import RobustRound, s6_active
from strategies.robust.math import TooFewReplies
from edge_lam.config.run_config import RunConfig
from edge_lam.logs import get_logger
from edge_lam.training.lora import State

log = get_logger()


class Aggregation(Protocol):
    """One round's aggregation of the accepted replies."""

    overridden: bool  # the strategy replaces the LoRA aggregation of `cfg.aggregation`

    def aggregate(self, server_round: int, start: State, sent: Sequence[State],
                  states: Sequence[State], counts: Sequence[int], nodes: Sequence[int]
                  ) -> tuple[State, dict]: ...


class RobustAggregation:
    """S6 around an aggregation; its trust per device (last weight x K) is a checkpoint
    part (`strategies.lora.resume`, entry `trust`)."""

    entry = "trust"

    def __init__(self, cfg: RunConfig, label_names: tuple[str, ...], inner: Aggregation):
        self.cfg, self.inner, self.overridden = cfg, inner, inner.overridden
        self.round = RobustRound(cfg, label_names, trust=NodeTable("trust", float))

    @property
    def trust(self) -> NodeTable:
        return self.round.trust

    def aggregate(self, server_round: int, start: State, sent: Sequence[State],
                  states: Sequence[State], counts: Sequence[int], nodes: Sequence[int]
                  ) -> tuple[State, dict]:
        try:
            new_state, info = self.round.aggregate(server_round, start, sent, states, counts,
                                                   nodes)
        except TooFewReplies as err:  # e.g. K < 2f + 3 replies for Krum this round
            log.warning("round %d: robust.aggregator='%s' cannot aggregate these %d "
                        "replies (%s); keeping the previous global model", server_round,
                        self.cfg.robust.aggregator, len(states), err)
            return start, {"robust": {"skipped": str(err)}}
        if new_state is None:  # report only: the wrapped aggregation's state
            new_state, more = self.inner.aggregate(server_round, start, sent, states, counts,
                                                   nodes)
            info.update(more)
        return new_state, info

    def checkpoint_state(self, name_of: Callable[[int], str]) -> tuple[dict, State]:
        return self.trust.checkpoint_state(name_of)

    def restore(self, saved: dict | None, restored: Restored) -> None:
        self.trust.restore(saved, restored)

    def move(self, old: int, new: int) -> None:
        self.trust.move(old, new)


def wrap_robust(cfg: RunConfig, label_names: tuple[str, ...], inner: Aggregation
                ) -> Aggregation:
    """`inner` wrapped in S6 when `robust.aggregator` / `robust.contribution` are on. Where
    S6 does not apply (it works on the LoRA aggregations of factors) the config is refused
    when parsed (`RobustSection.check`, from the algorithm's `Traits.aggregates_own_way`);
    a strategy that overrides `_aggregate` while its Traits say otherwise is a plug-in bug
    (TypeError)."""
    if not s6_active(cfg):
        return inner
    if inner.overridden:
        raise TypeError(f"strategy='{cfg.strategy}' overrides _aggregate, but its algorithm's "
                        "Traits.aggregates_own_way(cfg) is False: return True there, so that "
                        "robust.* is refused when the config is parsed")
    return RobustAggregation(cfg, tuple(label_names), inner)
