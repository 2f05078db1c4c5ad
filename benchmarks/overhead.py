"""Framework overhead: wall time of each simulated round against the devices' pure training.

Reads the metrics.jsonl of a Flower run (`flwr run . --stream`) and writes a table:
round wall time, sum and max of the devices' local training seconds, server evaluation
seconds, and what is left (Flower messaging, Ray actors, (de)serialisation, aggregation).

    python benchmarks/overhead.py results/<run-id>/metrics.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    path = Path(sys.argv[1])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    lines = ["| round | devices | round wall s | sum local train s | max local train s | "
             "server eval s | overhead s (wall - sum train - eval) | overhead share |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows[1:]:
        train = [c["train_s"] for c in r["clients"]]
        ev = r.get("eval_s") or 0.0
        rest = r["wall_s"] - sum(train) - ev
        lines.append(f"| {r['round']} | {len(train)} | {r['wall_s']:.1f} | {sum(train):.1f} | "
                     f"{max(train):.1f} | {ev:.1f} | {rest:.1f} | {rest / r['wall_s']:.0%} |")
    out = Path(__file__).parent / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
