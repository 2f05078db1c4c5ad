"""S7 sub-model federated learning of the token embedding (`strategy='submodel'`).

Next to the LoRA adapters, each device trains only the embedding rows its data uses (the
table is also the output head in SmolLM2 and Gemma 3), optionally hidden among decoys.
- `config`: the `submodel.*` section and traits; `math`: row sets, decoys and their privacy
  bound, per-row weighted aggregation (pure numpy); `rows`: the table in torch (apply rows,
  train rows through the tied head, save them as PEFT trainable tokens); `device`: the rows
  QUERY and the TRAIN handler; `strategy` / `server`: the Flower strategy and run driver.
"""

from strategies import lora
from strategies.registry import Algorithm, register
from strategies.submodel import device, server
from strategies.submodel.config import SubmodelSection, SubmodelTraits

register(Algorithm(
    "submodel", "S7: LoRA + the token-embedding rows each device's data touches, aggregated "
    "per row by use counts (decoys optional)",
    SubmodelTraits(lora.TRAITS), run=server.run,
    handlers={"train": device.train, "query.rows": device.rows},
    section=("submodel", SubmodelSection)))
