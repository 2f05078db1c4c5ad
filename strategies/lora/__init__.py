"""LoRA aggregation across heterogeneous ranks (S1): fedavg, hetlora, flexlora.

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


TRAITS = {"fedavg": FedAvgTraits(), "hetlora": Traits(), "flexlora": Traits()}

for _name, _summary in (
        ("fedavg", "every device at lora.fedavg-rank, plain FedAvg (the baseline)"),
        ("hetlora", "S1: each device at its own rank; zero-pad, weighted mean, truncate"),
        ("flexlora", "S1: weighted mean of the products B A, SVD, best rank-r_k factors")):
    register(Algorithm(_name, _summary, TRAITS[_name], run=server.run,
                       handlers={"train": device.train}))
