"""FedKD (S3): private local modules that never leave a device, a shared module that is the
only thing transmitted, mutual distillation between them, SVD-compressed updates.

- `config`: the `fedkd.*` section and traits; `math`: losses, compression, per-task
  aggregation (pure); `distill`: the mutual-distillation objective of the local loop;
  `strategy`: the Flower strategy; `device`: the device's round and state folder; `evaluation`
  and `server`: per-task evaluation, adapters and the run driver.
"""

from strategies.fedkd import device, server
from strategies.fedkd.config import FedKDSection, FedKDTraits
from strategies.registry import Algorithm, register

register(Algorithm(
    "fedkd", "S3: private local modules + a shared module, mutual distillation",
    FedKDTraits(), run=server.run, handlers={"train": device.train},
    section=("fedkd", FedKDSection)))
