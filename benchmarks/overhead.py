"""Framework overhead: wall time of each simulated round against the devices' pure training.

Reads the metrics.jsonl of a Flower run (`flwr run . --stream`) and prints a table: round
wall time, sum and max of the devices' local training seconds, server evaluation seconds, and
what is left (Flower messaging, Ray actors, (de)serialisation, model loading, aggregation).
`benchmarks/default_run.py` records the same table for README's quick start.

    python benchmarks/overhead.py results/<run-id>/metrics.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def overhead_rows(rows: list[dict]) -> list[dict]:
    """Per training round: wall, sum/max of local training, evaluation, and the rest."""
    table = []
    for r in rows[1:]:
        train = [c["train_s"] for c in r["clients"]] or [0.0]
        ev = r.get("eval_s") or 0.0
        rest = r["wall_s"] - sum(train) - ev
        table.append({"round": r["round"], "devices": len(r["clients"]), "wall_s": r["wall_s"],
                      "train_sum_s": sum(train), "train_max_s": max(train), "eval_s": ev,
                      "overhead_s": rest, "overhead_share": rest / r["wall_s"]})
    return table


def overhead_table(table: list[dict]) -> list[str]:
    lines = ["| round | devices | round wall s | sum local train s | max local train s | "
             "server eval s | overhead s (wall - sum train - eval) | overhead share |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {t['round']} | {t['devices']} | {t['wall_s']:.1f} | {t['train_sum_s']:.1f} | "
              f"{t['train_max_s']:.1f} | {t['eval_s']:.1f} | {t['overhead_s']:.1f} | "
              f"{t['overhead_share']:.0%} |" for t in table]
    return lines


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: python benchmarks/overhead.py results/<run-id>/metrics.jsonl")
    rows = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines()]
    print("\n".join(overhead_table(overhead_rows(rows))))


if __name__ == "__main__":
    main()
