"""The `submodel.*` section and the traits of `strategy='submodel'` (S7): LoRA adapters plus
the token-embedding rows each device's data touches."""

from __future__ import annotations

from dataclasses import dataclass

from edge_lam.config.run_config import RunConfig, Traits
from edge_lam.models.families import family
from edge_lam.config.options import ConfigError, Section, option

AGGREGATIONS = ("fedavg", "hetlora", "flexlora")
ROWS = ("touched", "all", "none")


@dataclass(frozen=True)
class SubmodelSection(Section):
    """S7 sub-model federated learning of the token embedding, used by
    `strategy='submodel'`."""

    aggregation: str = option("flexlora", "how the LoRA adapters aggregate: `fedavg`, "
                              "`hetlora`, `flexlora`", choices=AGGREGATIONS)
    rows: str = option("touched", "embedding rows a device trains: `touched` (S7: the rows its "
                       "data uses, aggregated per row by use counts), `all` (the full table, "
                       "FedAvg by examples: the baseline), `none` (LoRA only)", choices=ROWS)
    lr: float = option(1e-4, "AdamW learning rate of the embedding rows", lo=1e-12)
    decoys: bool = option(False, "hide a device's rows among decoys (randomized response): "
                          "each other id is requested with probability q = keep * "
                          "exp(-epsilon)")
    epsilon: float = option(3.0, "with decoys: P(requested | own row) / P(requested | not) = "
                            "e^epsilon for every id (q = keep * e^-epsilon)", lo=0.0)
    keep: float = option(1.0, "with decoys: probability that an own row is requested (1: "
                         "always; below 1 the rows not requested are deniable too, epsilon-LDP "
                         "= max(ln(keep/q), ln((1-q)/(1-keep))), and those rows go untrained)",
                         lo=1e-6, hi=1.0)
    secure: bool = option(True, "rows='touched': secure aggregation of the row uplink: each "
                          "device sends, for every row of the union U of the round's requests, "
                          "fixed-point (count x value, count) plus pairwise masks that cancel "
                          "in the sum, so the server learns only per-row sums (not which rows "
                          "a device trained); false: plain rows (ids, values, counts) of the "
                          "device's own rows (fewer bytes; refused with decoys)")
    secure_bits: int = option(32, "with secure: fractional bits of the fixed point (mod 2^64); "
                              "each device's |count x value| must stay below 2^(63 - bits) / "
                              "devices in the round", lo=8, hi=48)

class SubmodelTraits(Traits):
    """Ranks and r_max as `submodel.aggregation`'s; every LoRA round also trains rows."""

    def __init__(self, aggregation_traits: dict[str, Traits]):
        self._by_aggregation = aggregation_traits

    def aggregation(self, cfg: RunConfig) -> str:
        return cfg.submodel.aggregation

    def _agg(self, cfg: RunConfig) -> Traits:
        return self._by_aggregation[cfg.submodel.aggregation]

    def r_max(self, cfg: RunConfig) -> int:
        return self._agg(cfg).r_max(cfg)

    def rank_for(self, cfg: RunConfig, device: str, explicit_rank: int = 0) -> int:
        return self._agg(cfg).rank_for(cfg, device, explicit_rank)

    def aggregates_own_way(self, cfg: RunConfig) -> bool:
        return True  # the LoRA aggregation plus the embedding rows' (S7)

    def check(self, cfg: RunConfig) -> None:
        if not family(cfg).generates:
            raise ConfigError(f"strategy='submodel' trains token-embedding rows of a causal LM: "
                              f"set task='causal-lm' (not '{cfg.task}')")
        if cfg.dp.enabled:
            raise ConfigError("strategy='submodel' does not train under dp.enabled (Opacus "
                              "does not clip the embedding rows): set dp.enabled=false")
        if cfg.submodel.decoys and cfg.submodel.rows != "touched":
            raise ConfigError(f"submodel.decoys hides the touched rows; submodel.rows="
                              f"'{cfg.submodel.rows}' requests none or all: set "
                              "submodel.rows='touched' or submodel.decoys=false")
        if cfg.submodel.decoys and not cfg.submodel.secure:
            raise ConfigError("submodel.decoys without submodel.secure: the plain uplink "
                              "names the device's true rows (count > 0), so the decoys would "
                              "hide nothing from the server: set submodel.secure=true")
