"""LoRA aggregation across heterogeneous ranks (S1): fedavg, hetlora, flexlora, rankwise,
hetlora-sw, flexlora-delta, flora, fedex.

- `math`: the aggregations as pure functions, registered as AGGREGATION_RULES;
- `strategy`: the Flower strategy (FedAvg subclass: unicast per-rank payloads, validated
  replies, the aggregation hook S6 wraps, `strategies.robust.wrapper`), with its concerns
  split out: `profiles` (who is who: the profile QUERY, the capability rank), `budget` (the
  DP budget stop), `resume` (the CheckpointPart state protocol, StrategyCheckpoint);
  selection is the fleet clock's registered policy (`strategies.fleet.policy`);
- `checkpoint`: the exact-resume files of a run; `server`: the run driver; `device`: the
  TRAIN handler.
- fedavg: every device at lora.fedavg-rank; hetlora / flexlora: each at its profile's rank.
"""

from strategies.lora import device, server
from strategies.registry import Algorithm, register
from edge_lam.config.run_config import RunConfig, Traits


class FedAvgTraits(Traits):
    """Every device at the one rank lora.fedavg-rank (the homogeneous baseline)."""

    def r_max(self, cfg: RunConfig) -> int:
        return cfg.lora.fedavg_rank

    def rank_for(self, cfg: RunConfig, device: str, explicit_rank: int = 0) -> int:
        return cfg.lora.fedavg_rank


class MergingTraits(Traits):
    """Each device at its profile's rank; the global state also holds the update merged into
    the frozen weights (`<layer>.base_delta`)."""

    def merges_into_base(self, cfg: RunConfig) -> bool:
        return True


TRAITS = {"fedavg": FedAvgTraits(), "hetlora": Traits(), "flexlora": Traits(),
          "rankwise": Traits(), "hetlora-sw": Traits(), "flexlora-delta": Traits(),
          "flora": MergingTraits(), "fedex": MergingTraits()}

for _name, _summary in (
        ("fedavg", "every device at lora.fedavg-rank, plain FedAvg (the baseline)"),
        ("hetlora", "S1: each device at its own rank; zero-pad, weighted mean, truncate"),
        ("flexlora", "S1: weighted mean of the products B A, SVD, best rank-r_k factors"),
        ("rankwise", "S1: zero-pad, but component j averaged only over the devices of rank "
                     "> j (weights renormalised: no shrinkage)"),
        ("hetlora-sw", "S1, HetLoRA's sparsity-weighted aggregation: per layer, device k "
                       "weighs n_k ||B_k A_k||_F"),
        ("flexlora-delta", "S1: FlexLoRA on updates: old product + weighted mean of each "
                           "device's change B'A' - BA, SVD to r_max"),
        ("flora", "S1, FLoRA's exact stacking: sum_k w_k B_k A_k merged into the frozen "
                  "weights each round, fresh adapters (downlink: dense merged weights)"),
        ("fedex", "S1, exact mixed-rank FedEx-LoRA: factors averaged as hetlora, the exact "
                  "remainder and each device's dropped components in the frozen weights")):
    register(Algorithm(_name, _summary, TRAITS[_name], run=server.run,
                       handlers={"train": device.train}))
