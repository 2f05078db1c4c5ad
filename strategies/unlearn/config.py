"""The `unlearn.*` section and the traits of `strategy='unlearn'` (S4): train, unlearn, recover."""

from __future__ import annotations

from dataclasses import dataclass

from edge_lam.config.run_config import RunConfig, Traits
from edge_lam.config.options import ConfigError, Section, option

AGGREGATIONS = ("fedavg", "hetlora", "flexlora")
LOSSES = ("bounded-ce", "fedosd")


@dataclass(frozen=True)
class UnlearnSection(Section):
    """S4 federated unlearning, used by `strategy='unlearn'`."""

    clients: tuple[int, ...] = option(
        (), "devices that opt out, comma-separated: partition ids in simulation, node ids in "
        "deployment (`'3'`, `'3,5'`); required by `strategy='unlearn'`, refused otherwise",
        kind="ids")
    aggregation: str = option("hetlora", "how training and recovery rounds aggregate: "
                              "`hetlora`, `fedavg`, `flexlora`", choices=AGGREGATIONS)
    after_rounds: int = option(-1, "training rounds before the request; -1 = "
                               "`num-server-rounds`, or 0 with `unlearn.from-adapter`", lo=-1)
    from_adapter: str = option("", "start from the global adapter of an earlier run, "
                               "`results/<run-id>/adapter`", allow_empty=True)
    rounds: int = option(2, "unlearning rounds (S4 steps 1-5)", lo=1)
    recovery_rounds: int = option(3, "training rounds on the remaining devices afterwards, "
                                  "with FedOSD drift removal", lo=0)
    loss: str = option("fedosd", "opting-out devices' loss: `fedosd` = -log(1 - p_y/2) "
                       "(descended), `bounded-ce` = -log(max(p_y, eps)) (ascended)",
                       choices=LOSSES)
    eps: float = option(0.01, "the floor eps of `bounded-ce`", lo=1e-12, hi=0.999)
    lr: float = option(1.0, "server step eta of theta <- theta - eta (mean g_remaining + mean "
                       "g_projected); model-dependent (MiniLM: 0.5 too weak, 2 wrecks the "
                       "model; see the benchmark): watch `unlearning.step_norm` and accuracy "
                       "in metrics.jsonl", lo=1e-12)
    grad_batches: int = option(4, "batches (of `train.batch-size`) each device averages its "
                               "gradient over", lo=1)

    def check(self, cfg) -> None:
        """unlearn.clients asks for an unlearning run: the algorithm must read this section."""
        if self.clients and not cfg.reads_section("unlearn"):
            raise ConfigError(
                f"unlearn.clients is set but strategy='{cfg.strategy}': add "
                "strategy='unlearn' to forget those devices, or clear unlearn.clients")


class UnlearnTraits(Traits):
    """Rounds 1..T train, T+1..T+U unlearn, then R recovery rounds; ranks as the aggregation."""

    def __init__(self, aggregation_traits: dict[str, Traits]):
        self._by_aggregation = aggregation_traits

    def aggregation(self, cfg: RunConfig) -> str:
        return cfg.unlearn.aggregation

    def _agg(self, cfg: RunConfig) -> Traits:
        return self._by_aggregation[cfg.unlearn.aggregation]

    def r_max(self, cfg: RunConfig) -> int:
        return self._agg(cfg).r_max(cfg)

    def rank_for(self, cfg: RunConfig, device: str, explicit_rank: int = 0) -> int:
        return self._agg(cfg).rank_for(cfg, device, explicit_rank)

    def secure_refusal(self, cfg: RunConfig) -> str:
        return ("strategy='unlearn' projects each device's gradient against the forgotten "
                "devices' own gradients")

    def training_rounds(self, cfg: RunConfig) -> int:
        u = cfg.unlearn
        if u.after_rounds >= 0:
            return u.after_rounds
        return 0 if u.from_adapter else cfg.num_rounds

    def total_rounds(self, cfg: RunConfig) -> int:
        return self.training_rounds(cfg) + cfg.unlearn.rounds + cfg.unlearn.recovery_rounds

    def planned_private_steps(self, cfg: RunConfig) -> int:
        """Local steps of training and recovery rounds + gradient batches of unlearning."""
        train = self.training_rounds(cfg) + cfg.unlearn.recovery_rounds
        return train * cfg.train.local_steps + cfg.unlearn.rounds * cfg.unlearn.grad_batches

    def aggregates_own_way(self, cfg: RunConfig) -> bool:
        return True  # unlearning rounds aggregate gradients (S4)

    def check(self, cfg: RunConfig) -> None:
        u = cfg.unlearn
        if not u.clients:
            raise ConfigError(
                "strategy='unlearn' needs unlearn.clients: name the devices that opt out, "
                "e.g. unlearn.clients='3' or '3,5' (partition ids in simulation, node ids in "
                "deployment)")
        if self.training_rounds(cfg) == 0 and not u.from_adapter:
            raise ConfigError(
                "unlearn.after-rounds=0 leaves nothing to unlearn: train first "
                "(unlearn.after-rounds > 0) or start from a saved adapter with "
                "unlearn.from-adapter='results/<run-id>/adapter'")
