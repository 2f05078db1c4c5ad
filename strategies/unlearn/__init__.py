"""S4 federated unlearning with orthogonal projection (`strategy='unlearn'`).

- `config`: the `unlearn.*` section and the traits (rounds: train, unlearn, recover);
- `math`: projection, update rule, losses, drift removal (pure); `steps`: the same on LoRA
  states padded to r_max; `strategy`: the Flower strategy; `request`: `unlearning.json`;
  `server`: the run driver and the run guard; `device`: the gradient handler.
"""

from strategies import lora
from strategies.registry import Algorithm, add_run_guard, register
from strategies.unlearn import device, server
from strategies.unlearn.config import UnlearnSection, UnlearnTraits

register(Algorithm(
    "unlearn", "S4: train, then forget unlearn.clients by orthogonal projection, then recover",
    UnlearnTraits(lora.TRAITS), run=server.run,
    handlers={"train": lora.device.train, "train.gradient": device.gradient},
    section=("unlearn", UnlearnSection)))
add_run_guard(server.guard)
