"""The device side of the LoRA algorithms (S1): one TRAIN message, one local round.

The server's message holds the global adapter truncated to this device's rank, and in its
config the round, the rank and r_max (the LoRA scaling is alpha / r_max on every device). The
reply holds the trained adapter at that rank, n_k and metrics. With dp.enabled every step goes
through Opacus; the device's accountant lives in `context.state` (or the node's
`privacy-ledger` file) and a device whose budget is spent says so (`budget-exhausted`).
The helpers below serve every algorithm whose devices train LoRA adapters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from strategies.robust import inject
from edge_lam.config.run_config import RunConfig
from edge_lam.training.device import DeviceInfo, local_examples
from edge_lam.logs import get_logger
from edge_lam.training.lora import State, expand_base_deltas, lora_rank
from edge_lam.records import from_record, to_record

log = get_logger()


@dataclass(frozen=True)
class Round:
    """What a TRAIN message tells a device: its info, the round, its rank, r_max, labels."""

    cfg: RunConfig
    info: DeviceInfo
    config: ConfigRecord
    server_round: int
    rank: int
    r_max: int
    label_names: tuple[str, ...]
    tag: str

    @classmethod
    def of(cls, msg: Message, context: Context, cfg: RunConfig) -> Round:
        config = msg.content["config"]
        rank, server_round = int(config["rank"]), int(config["server-round"])
        tag = (f"[round {server_round}] device {config.get('device', '?')} "
               f"(node {context.node_id}) rank {rank}:")
        return cls(cfg, DeviceInfo.from_node_config(context.node_config), config,
                   server_round, rank, int(config["r-max"]),
                   tuple(config.get("label-names", [])), tag)

    def checked(self, state: State) -> State:
        if lora_rank(state) != self.rank:
            raise ValueError(f"server sent factors of rank {lora_rank(state)} but assigned "
                             f"{self.rank}")
        return state


def train(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """S1 local round: train the received adapter at this device's rank, reply with it."""
    rnd = Round.of(msg, context, cfg)
    fault = inject.fault_reply(msg, cfg, rnd.info.partition_id, rnd.server_round, rnd.tag)
    if fault is not None:  # faults.* (simulation): crash raises, error replies, timeout sleeps
        return fault
    # lora.base-delta-rank: base deltas may come as factors (strategies/lora/strategy.py)
    state = rnd.checked(expand_base_deltas(from_record(msg.content["arrays"])))
    privacy = open_privacy(rnd, context)
    if privacy is not None and not privacy.can_step():
        return budget_exhausted(msg, privacy, rnd)
    log.info("%s training %d local steps", rnd.tag, cfg.train.local_steps)
    new_state, num_examples, metrics = inject.train_round(  # attack.* (simulation), or honest
        cfg, rnd.info, rnd.label_names, rnd.rank, state, rnd.server_round, tag=rnd.tag,
        privacy=privacy, r_max=rnd.r_max)
    save_privacy(privacy, rnd.info, context)
    reply = RecordDict({
        "arrays": to_record(new_state),
        "metrics": MetricRecord({"num-examples": num_examples,
                                 "train-loss": metrics["train_loss"],
                                 "train-s": metrics["train_s"], "rank": rnd.rank,
                                 "steps": metrics["steps"], **privacy_metrics(metrics)}),
    })
    return Message(reply, reply_to=msg)


# ------------------------------------------------------------------------------ privacy
def open_privacy(rnd: Round, context: Context):
    """This device's Opacus accountant as it stood after its last release (None: no DP)."""
    if not rnd.cfg.dp.enabled:
        return None
    from edge_lam.training.privacy import DevicePrivacy

    ledger = None
    if rnd.info.privacy_ledger and Path(rnd.info.privacy_ledger).is_file():
        ledger = json.loads(Path(rnd.info.privacy_ledger).read_text())
    elif "privacy" in context.state:
        ledger = json.loads(str(context.state["privacy"]["ledger"]))
    examples = local_examples(rnd.cfg, rnd.info, rnd.label_names)
    return DevicePrivacy(rnd.cfg, len(examples), ledger)


def save_privacy(privacy, info: DeviceInfo, context: Context) -> None:
    if privacy is None:
        return
    ledger = json.dumps(privacy.ledger())
    context.state["privacy"] = ConfigRecord({"ledger": ledger})
    if info.privacy_ledger:
        Path(info.privacy_ledger).write_text(ledger)


def privacy_metrics(metrics: dict) -> dict:
    if "epsilon" not in metrics:
        return {}
    return {"epsilon": metrics["epsilon"], "noise-multiplier": metrics["noise_multiplier"],
            "private-steps": metrics["private_steps"],
            "budget-exhausted": int(metrics["budget_exhausted"])}


def budget_exhausted(msg: Message, privacy, rnd: Round) -> Message:
    """No training: one more step would spend more than dp.target-epsilon. Say so."""
    eps = privacy.epsilon()
    log.warning("%s privacy budget exhausted (epsilon %.3f spent of dp.target-epsilon=%g): "
                "not training", rnd.tag, eps, rnd.cfg.dp.target_epsilon)
    metrics = MetricRecord({
        "num-examples": len(local_examples(rnd.cfg, rnd.info, rnd.label_names)),
        "budget-exhausted": 1, "epsilon": eps, "noise-multiplier": privacy.noise_multiplier,
        "private-steps": privacy.steps})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
