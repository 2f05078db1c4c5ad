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
from task.config import RunConfig
from task.logs import get_logger
from task.lora import State
from task.options import ConfigError

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
        except ConfigError as err:  # e.g. too few replies for Krum this round
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
    """`inner` wrapped in S6 when `robust.aggregator` / `robust.contribution` are on
    (ConfigError where S6 does not apply: it works on the LoRA aggregations of factors)."""
    if not s6_active(cfg):
        return inner
    why = ""
    if inner.overridden:
        why = f"strategy='{cfg.strategy}' aggregates its own way"
    elif cfg.merges_into_base:
        why = f"strategy='{cfg.strategy}' merges updates into the frozen weights"
    elif cfg.fleet.selection == "fedlaavg":
        why = "fleet.selection='fedlaavg' aggregates every device's stored update"
    if why:
        raise ConfigError(f"robust.aggregator='{cfg.robust.aggregator}' / robust."
                          f"contribution='{cfg.robust.contribution}' work on the LoRA "
                          f"aggregations of factors (fedavg, hetlora, flexlora, rankwise,"
                          f" hetlora-sw, flexlora-delta), but {why}: set robust.aggregator"
                          "='none' robust.contribution='off' or pick one of those")
    return RobustAggregation(cfg, tuple(label_names), inner)
