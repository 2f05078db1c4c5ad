"""Communication per device per round against the full model's size, per LoRA rank.

Builds the real adapter of each rank on all-MiniLM-L6-v2 (query,value + head) and counts the
bytes that cross the network each way (float32 arrays, as the app sends them).

    python benchmarks/communication.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from task.config import RunConfig  # noqa: E402
from task.lora import state_nbytes  # noqa: E402
from task.model import get_lora_model, get_trainable_state  # noqa: E402

LABELS = ("Business", "Sci/Tech", "Sports", "World")


def main() -> None:
    out = Path(__file__).parent / "results"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    full = None
    for rank in (2, 4, 8, 16):
        cfg = RunConfig.from_run_config({"strategy": "fedavg", "lora.fedavg-rank": rank})
        model = get_lora_model(cfg, LABELS, rank)
        if full is None:
            full = sum(p.numel() * 4 for n, p in model.get_base_model().named_parameters()
                       if "lora_" not in n and "modules_to_save" not in n)
        state = get_trainable_state(model)
        nbytes = state_nbytes(state)
        rows.append({"rank": rank, "bytes_per_direction": nbytes, "full_model_bytes": full,
                     "fraction_of_full": nbytes / full})
    lines = ["| rank | bytes up (= down) per device per round | full model (fp32) | share |",
             "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['rank']} | {r['bytes_per_direction']:,} | {r['full_model_bytes']:,} | "
                     f"{100 * r['fraction_of_full']:.3f}% |")
    (out / "communication.md").write_text("\n".join(lines) + "\n")
    (out / "communication.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
