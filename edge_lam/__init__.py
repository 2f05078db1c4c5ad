"""edge-lam's library: what the server and the devices share, one subpackage per concern.

- `config/`: run-config options and sections, `RunConfig`, the one plug-in registry, the
  device-profile table
- `models/`: model families (`task` key: seq-cls, causal-lm, lm-cls), loading with LoRA,
  weight sources (hub, folder, GGUF, known names)
- `data/`: local folders or hub datasets, columns, partitioners, tokenized batches
- `training/`: LoRA rank algebra, the one local loop, privacy, a device's round, capability,
  server-side evaluation and saved adapters
- `serving/`: what devices run for inference (answers, layer ranges, MoE experts, CoT steps)
- `cli/`: the `edge-lam` console entry points (the library never imports it)

Top level, used by every concern: `logs` (the logger), `records` (state dicts as Flower
records), `messaging` (QUERY and per-device messages), `results` (results/<run-id>/).
The library imports nothing from `strategies/`, `server_app/` or `client_app/`.
"""
