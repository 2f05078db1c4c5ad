"""LoRA aggregation across heterogeneous ranks (S1): fedavg, hetlora, flexlora, rankwise,
hetlora-sw, flexlora-delta.

- `math`: the aggregations as pure functions; `strategy`: the Flower strategy (unicast
  per-rank payloads, validated replies); `server`: the run driver; `device`: the TRAIN handler.
- fedavg: every device at lora.fedavg-rank; hetlora / flexlora: each at its profile's rank.
"""

from strategies.lora import device, server
from strategies.registry import Algorithm, register
from task.config import RunConfig, Traits


class FedAvgTraits(Traits):
    """Every device at the one rank lora.fedavg-rank (the homogeneous baseline)."""

    def r_max(self, cfg: RunConfig) -> int:
        return cfg.lora.fedavg_rank

    def rank_for(self, cfg: RunConfig, device: str, explicit_rank: int = 0) -> int:
        return cfg.lora.fedavg_rank


TRAITS = {"fedavg": FedAvgTraits(), "hetlora": Traits(), "flexlora": Traits(),
          "rankwise": Traits(), "hetlora-sw": Traits(), "flexlora-delta": Traits()}

for _name, _summary in (
        ("fedavg", "every device at lora.fedavg-rank, plain FedAvg (the baseline)"),
        ("hetlora", "S1: each device at its own rank; zero-pad, weighted mean, truncate"),
        ("flexlora", "S1: weighted mean of the products B A, SVD, best rank-r_k factors"),
        ("rankwise", "S1: zero-pad, but component j averaged only over the devices of rank "
                     "> j (weights renormalised: no shrinkage)"),
        ("hetlora-sw", "S1, HetLoRA's sparsity-weighted aggregation: per layer, device k "
                       "weighs n_k ||B_k A_k||_F"),
        ("flexlora-delta", "S1: FlexLoRA on updates: old product + weighted mean of each "
                           "device's change B'A' - BA, SVD to r_max")):
    register(Algorithm(_name, _summary, TRAITS[_name], run=server.run,
                       handlers={"train": device.train}))
