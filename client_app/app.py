"""The Flower ClientApp each device runs (simulation worker or `flower-supernode`).

- QUERY: tell the server who this device is (profile, partition, explicit rank).
- TRAIN: receive the global adapter truncated to this device's rank (unicast), train, reply.
  With strategy='fedkd' (S3): receive the shared module (or its compressed update), train it
  and the private local module by mutual distillation, reply with the shared module only.
- TRAIN "gradient" (S4 unlearning rounds): reply the gradient of the task loss (remaining
  devices) or of the unlearning loss (opting-out devices). An opting-out device keeps its own
  copy of the model in `context.state` and, after the first unlearning round, receives only
  the projected update to apply to it.
With dp.enabled every step and every gradient goes through Opacus, the device's accountant is
kept in `context.state` (or the node's `privacy-ledger` file) and each reply reports epsilon;
a device whose budget is spent stops and says so (`budget-exhausted`).
"""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.device import DeviceInfo, gradient_round, local_examples, train_round
from client_app.fedkd import DeviceStore, device_round
from task.config import RunConfig
from task.lora import State, lora_rank
from task.records import from_record, to_record
from task.logs import get_logger

log = get_logger()

app = ClientApp()

_LOCAL_MODEL = "unlearn-model"  # context.state key: an opting-out device's own model


@app.query()
def query(msg: Message, context: Context) -> Message:
    info = DeviceInfo.from_node_config(context.node_config)
    profile = ConfigRecord({"device": info.device, "partition-id": info.partition_id,
                            "num-partitions": info.num_partitions, "lora-rank": info.lora_rank,
                            "task": info.task})
    return Message(RecordDict({"profile": profile}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = RunConfig.from_run_config(context.run_config)
    if cfg.strategy == "fedkd":
        return train_fedkd(msg, context, cfg)
    cfg, info, config, rank, label_names, tag = _setup(msg, context, cfg)
    state = _checked(from_record(msg.content["arrays"]), rank)
    privacy = _open_privacy(cfg, info, label_names, context)
    if privacy is not None and not privacy.can_step():
        return _budget_exhausted(msg, privacy, tag, cfg, info, label_names)
    log.info("%s training %d local steps", tag, cfg.local_steps)
    new_state, num_examples, metrics = train_round(cfg, info, label_names, rank, state,
                                                   int(config["server-round"]), tag=tag,
                                                   privacy=privacy)
    _save_privacy(privacy, info, context)
    reply = RecordDict({
        "arrays": to_record(new_state),
        "metrics": MetricRecord({"num-examples": num_examples,
                                 "train-loss": metrics["train_loss"],
                                 "train-s": metrics["train_s"], "rank": rank,
                                 "steps": metrics["steps"], **_privacy_metrics(metrics)}),
    })
    return Message(reply, reply_to=msg)


@app.train("gradient")
def gradient(msg: Message, context: Context) -> Message:
    """S4 step 1: g_k at the model this device holds (global, or its own when opting out)."""
    cfg, info, config, rank, label_names, tag = _setup(msg, context)
    objective = str(config["objective"])
    if "arrays" in msg.content:  # the global module
        state = _checked(from_record(msg.content["arrays"]), rank)
    else:  # an opting-out device: its own model plus the projected update (S4 step 5)
        if _LOCAL_MODEL not in context.state:
            raise RuntimeError(f"{tag} received a projected update but holds no model to "
                               "apply it to (the first unlearning round sends the model)")
        own = from_record(context.state[_LOCAL_MODEL])
        update = _checked(from_record(msg.content["update"]), rank)
        state = {k: own[k] + update[k] for k in own}
    if objective == "unlearn":
        context.state[_LOCAL_MODEL] = to_record(state)
    privacy = _open_privacy(cfg, info, label_names, context)
    if privacy is not None and not privacy.can_step():
        return _budget_exhausted(msg, privacy, tag, cfg, info, label_names)
    grads, num_examples, metrics = gradient_round(cfg, info, label_names, rank, state,
                                                  int(config["server-round"]), objective,
                                                  tag=tag, privacy=privacy)
    _save_privacy(privacy, info, context)
    reply = RecordDict({
        "gradient": to_record(grads),
        "metrics": MetricRecord({"num-examples": num_examples, "loss": metrics["loss"],
                                 "grad-s": metrics["grad_s"], "rank": rank,
                                 "batches": metrics["batches"],
                                 **_privacy_metrics(metrics)}),
    })
    return Message(reply, reply_to=msg)


# ------------------------------------------------------------------------------ helpers
def _setup(msg: Message, context: Context, cfg: RunConfig | None = None):
    cfg = cfg or RunConfig.from_run_config(context.run_config)
    info = DeviceInfo.from_node_config(context.node_config)
    config = msg.content["config"]
    rank = int(config["rank"])
    label_names = tuple(config.get("label-names", []))
    tag = (f"[round {int(config['server-round'])}] device {config.get('device', '?')} "
           f"(node {context.node_id}) rank {rank}:")
    return cfg, info, config, rank, label_names, tag


def _checked(state: State, rank: int) -> State:
    if lora_rank(state) != rank:
        raise ValueError(f"server sent factors of rank {lora_rank(state)} but assigned {rank}")
    return state


def _open_privacy(cfg: RunConfig, info: DeviceInfo, label_names, context: Context):
    """This device's Opacus accountant as it stood after its last release (None: no DP)."""
    if not cfg.dp_enabled:
        return None
    from task.privacy import DevicePrivacy

    ledger = None
    if info.privacy_ledger and Path(info.privacy_ledger).is_file():
        ledger = json.loads(Path(info.privacy_ledger).read_text())
    elif "privacy" in context.state:
        ledger = json.loads(str(context.state["privacy"]["ledger"]))
    return DevicePrivacy(cfg, len(local_examples(cfg, info, label_names)), ledger)


def _save_privacy(privacy, info: DeviceInfo, context: Context) -> None:
    if privacy is None:
        return
    ledger = json.dumps(privacy.ledger())
    context.state["privacy"] = ConfigRecord({"ledger": ledger})
    if info.privacy_ledger:
        Path(info.privacy_ledger).write_text(ledger)


def _privacy_metrics(metrics: dict) -> dict:
    if "epsilon" not in metrics:
        return {}
    return {"epsilon": metrics["epsilon"], "noise-multiplier": metrics["noise_multiplier"],
            "private-steps": metrics["private_steps"],
            "budget-exhausted": int(metrics["budget_exhausted"])}


def _budget_exhausted(msg: Message, privacy, tag: str, cfg: RunConfig, info: DeviceInfo,
                      label_names) -> Message:
    """No training: one more step would spend more than dp.target-epsilon. Say so."""
    eps = privacy.epsilon()
    log.warning("%s privacy budget exhausted (epsilon %.3f spent of dp.target-epsilon=%g): "
                "not training", tag, eps, cfg.dp_target_epsilon)
    metrics = MetricRecord({
        "num-examples": len(local_examples(cfg, info, label_names)), "budget-exhausted": 1,
        "epsilon": eps, "noise-multiplier": privacy.noise_multiplier,
        "private-steps": privacy.steps})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def train_fedkd(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """S3 round: the reply holds the shared module (or its update) and metrics; the private
    local module stays in this device's state folder."""
    info = DeviceInfo.from_node_config(context.node_config)
    config = msg.content["config"]
    task, server_round = str(config["task"]), int(config["server-round"])
    energy = float(config["energy"]) or None  # 0.0: compression off
    store = DeviceStore.for_device(cfg, info, context.run_id, context.node_id)
    tag = f"[round {server_round}] {task} device (node {context.node_id}):"
    log.info("%s FedKD, %d local steps, state in %s", tag, cfg.local_steps, store.root)
    payload, num_examples, metrics = device_round(
        cfg, info, store, task, tuple(config["label-names"]), from_record(msg.content["arrays"]),
        int(config["base-round"]), server_round, energy, tag=tag)
    reply_metrics = {"num-examples": num_examples, "train-loss": metrics["train_loss"],
                     "train-s": metrics["train_s"], "rank": cfg.fedkd_shared_rank,
                     "local-loss": metrics["local_loss"]}
    if "local_accuracy" in metrics:
        reply_metrics["local-accuracy"] = metrics["local_accuracy"]
    reply = RecordDict({"arrays": to_record(payload), "metrics": MetricRecord(reply_metrics)})
    return Message(reply, reply_to=msg)
