"""Communication per device per round against the full model's size, per LoRA rank.

Builds the real adapter of each rank on all-MiniLM-L6-v2 (query,value + head) and counts, per
direction, its payload bytes (the raw float32 arrays) and its wire bytes (the arrays serialised
as Flower sends them: what `bytes_up` / `bytes_down` in metrics.jsonl count).

    python benchmarks/communication.py
    python benchmarks/communication.py --render     # communication.md from communication.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_line, provenance, read_json, write_json  # noqa: E402
from edge_lam.config.run_config import RunConfig  # noqa: E402
from edge_lam.training.lora import state_nbytes  # noqa: E402
from edge_lam.models.lora_model import get_lora_model, get_trainable_state  # noqa: E402
from edge_lam.records import record_nbytes, to_record  # noqa: E402

LABELS = ("Business", "Sci/Tech", "Sports", "World")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    ap.add_argument("--ranks", default="2,4,8,16")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--render", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    if not args.render:
        started = time.perf_counter()
        rows, full = [], None
        for rank in (int(r) for r in args.ranks.split(",")):
            cfg = RunConfig.from_run_config({"strategy": "fedavg", "lora.fedavg-rank": rank,
                                             "model": args.model})
            model = get_lora_model(cfg, LABELS, rank)
            if full is None:
                full = sum(p.numel() * 4 for n, p in model.get_base_model().named_parameters()
                           if "lora_" not in n and "modules_to_save" not in n)
            state = get_trainable_state(model)
            rows.append({"rank": rank, "arrays": len(state),
                         "payload_bytes": state_nbytes(state),
                         "wire_bytes": record_nbytes(to_record(state)),
                         "full_model_bytes": full,
                         "fraction_of_full": state_nbytes(state) / full})
        write_json(out / "communication.json", {**provenance(started), "model": args.model,
                                                "rows": rows})
    write_report(out)


def write_report(out: Path) -> None:
    """communication.md, from communication.json alone."""
    res = read_json(out / "communication.json")
    lines = [f"Model `{res['model']}`; machine: {machine_line(res['machine'])}; command: "
             f"`{res['command']}`.", "",
             "| rank | arrays | payload bytes per direction | wire bytes per direction "
             "(metrics.jsonl) | full model (fp32 payload) | payload share |",
             "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['rank']} | {r['arrays']} | {r['payload_bytes']:,} | "
                     f"{r['wire_bytes']:,} | {r['full_model_bytes']:,} | "
                     f"{100 * r['fraction_of_full']:.3f}% |")
    (out / "communication.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
