"""The device side of `strategy='submodel'` (S7).

- QUERY `rows` (once per device; the answer is kept in `context.state` and repeated, so
  the decoys never change and cannot be intersected away across rounds): count the token
  ids of the local data (the device's true rows and its per-row weights), draw the request
  (`math.request_rows`) and send only the requested ids.
- TRAIN: the message holds the adapter at this device's rank and the requested rows'
  current values (`submodel.ids`, `submodel.rows`). The device puts those rows in its table
  (it holds the frozen base model, so every other row is the pre-trained one), trains its
  own rows together with the adapter (one parameter, read by the input embedding and the
  tied head), and replies with the adapter and the rows:
  - `submodel.secure` (default): the message also holds the union U of the round's
    requests (`submodel.union`); the device leaves, for the SecAgg+ mod
    (`strategies.secure.device.secagg_mod`) to mask, the fixed-point (count x value, count)
    of its own rows for each row of U (zeros for decoys and rows it does not hold),
    uint64 [|U|, d + 1] (`math.plain_upload`). No union (fewer than 3 devices, or the
    round's secure sum could not start): the rows are withheld;
  - otherwise: its own rows as (ids, values, counts) in the clear.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from strategies.lora.device import Round
from strategies.secure.device import PLAIN, round_devices
from strategies.submodel.math import decoy_rate, plain_upload, request_rows, touched_rows
from strategies.submodel.rows import applied_rows, trainable_rows
from edge_lam.config.run_config import RunConfig
from edge_lam.data.encode import batches, encode_batch
from edge_lam.training.device import DeviceInfo, local_examples, train_round
from edge_lam.logs import get_logger
from edge_lam.models.lora_model import get_lora_model, load_tokenizer, resolve_model_source
from edge_lam.records import from_record, to_record

log = get_logger()

IDS, ROWS, COUNTS = "submodel.ids", "submodel.rows", "submodel.counts"
UNION = "submodel.union"  # secure aggregation: the rows every share covers
_STATE = "submodel"  # context.state record: this device's request (ids, own?, counts)

def local_row_counts(cfg: RunConfig, info: DeviceInfo, label_names: tuple[str, ...],
                     vocab_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(ids, occurrences, examples) of the token ids the device's training data feeds the
    model, encoded as training encodes it (prompt format, truncation); padding excluded."""
    examples = local_examples(cfg, info, label_names)
    tokenizer = load_tokenizer(resolve_model_source(cfg.model))
    arrays = []
    for chunk in batches(examples, 64):
        batch = encode_batch(tokenizer, chunk, cfg)
        arrays.append(batch["input_ids"][batch["attention_mask"].bool()].numpy())
    ids, counts = touched_rows(arrays, vocab_size)
    return ids, counts, len(examples)


def device_request(cfg: RunConfig, info: DeviceInfo, label_names: tuple[str, ...],
                   vocab_size: int, node_id: int) -> dict[str, np.ndarray]:
    """{ids, own, counts}: the rows this device asks for, which are its own, and its
    per-row weights (0 for decoys and for own rows not requested)."""
    s = cfg.submodel
    if s.rows == "none":
        empty = np.zeros(0, np.int64)
        return {"ids": empty, "own": empty.astype(bool), "counts": empty.astype(np.float32)}
    true_ids, counts, n = local_row_counts(cfg, info, label_names, vocab_size)
    if s.rows == "all":  # full-table baseline: every row, weighted by examples
        return {"ids": np.arange(vocab_size, dtype=np.int64),
                "own": np.ones(vocab_size, bool),
                "counts": np.full(vocab_size, float(n), np.float32)}
    keep, q = (s.keep, decoy_rate(s.epsilon, s.keep)) if s.decoys else (1.0, 0.0)
    rng = np.random.default_rng([cfg.seed, max(info.partition_id, 0), node_id, 7])
    req = request_rows(true_ids, vocab_size, keep, q, rng)
    per_row = np.zeros(vocab_size, np.float32)
    per_row[true_ids] = counts
    return {"ids": req.ids, "own": req.true, "counts": np.where(req.true, per_row[req.ids], 0.0)
            .astype(np.float32)}


def _stored(context: Context) -> dict[str, np.ndarray] | None:
    if _STATE not in context.state:
        return None
    return {k: v.numpy() for k, v in context.state[_STATE].items()}


def secure_mode(cfg: RunConfig) -> bool:
    """Rows go up only as masked shares (`submodel.secure` with rows='touched')."""
    return cfg.submodel.secure and cfg.submodel.rows == "touched"


def rows(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """QUERY `rows`: this device's (decoy-padded) request, the same every time it is asked."""
    ask = msg.content["config"]
    request = _stored(context)
    if request is None:
        info = DeviceInfo.from_node_config(context.node_config)
        request = device_request(cfg, info, tuple(ask.get("label-names", [])),
                                 int(ask["vocab-size"]), context.node_id)
        context.state[_STATE] = to_record(request)
        log.info("device (node %d): %d own rows of %d, %d requested (%d decoys)",
                 context.node_id, int(request["own"].sum()), int(ask["vocab-size"]),
                 request["ids"].size, int((~request["own"]).sum()))
    reply = RecordDict({"rows": to_record({IDS: request["ids"]}),
                        "config": ConfigRecord({"requested": int(request["ids"].size)})})
    return Message(reply, reply_to=msg)


def train(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """S7 local round: the adapter and this device's own rows, trained together."""
    rnd = Round.of(msg, context, cfg)
    payload = from_record(msg.content["arrays"])
    ids, values = payload.pop(IDS), payload.pop(ROWS)
    union = payload.pop(UNION, None)
    state = rnd.checked(payload)
    request = _stored(context)
    if request is None or not np.array_equal(ids, request["ids"]):
        raise ValueError(f"{rnd.tag} the server sent {ids.size} rows that are not this "
                         "device's request (ask QUERY rows first)")
    own = request["own"] & (request["counts"] > 0)
    model = get_lora_model(cfg, rnd.label_names, rnd.rank, r_max=rnd.r_max)
    train_cfg = cfg.updated("train", head_lr=cfg.submodel.lr)
    new_values = np.array(values, dtype=np.float32, copy=True)
    with applied_rows(model, ids, values):
        if own.any():
            with trainable_rows(model, ids[own]) as param:
                new_state, n, metrics = train_round(train_cfg, rnd.info, rnd.label_names,
                                                    rnd.rank, state, rnd.server_round,
                                                    tag=rnd.tag, r_max=rnd.r_max)
                new_values[own] = param.detach().float().cpu().numpy()
        else:
            new_state, n, metrics = train_round(train_cfg, rnd.info, rnd.label_names,
                                                rnd.rank, state, rnd.server_round,
                                                tag=rnd.tag, r_max=rnd.r_max)
    info = {"num-examples": n, "train-loss": metrics["train_loss"],
            "train-s": metrics["train_s"], "rank": rnd.rank, "steps": metrics["steps"]}
    if not secure_mode(cfg):  # plain uplink: the own rows (no decoys: the request is own)
        uplink = {**new_state, IDS: ids, ROWS: new_values, COUNTS: request["counts"]}
        moved = float(np.abs(new_values[own] - values[own]).max()) if own.any() else 0.0
        info.update({"rows-trained": int(own.sum()), "rows-max-change": moved})
    elif union is None:  # secure, but the server runs no secure sum this round: withheld,
        uplink = dict(new_state)  # never sent in the clear
        log.warning("%s no union of rows from the server: rows withheld (secure "
                    "aggregation)", rnd.tag)
        info["rows-withheld"] = 1
    else:  # secure aggregation: per-row shares over U, masked by the SecAgg+ mod
        plain = plain_upload(np.asarray(union, np.int64), ids, new_values,
                             request["counts"], cfg.submodel.secure_bits,
                             round_devices(context))
        uplink = {**new_state, PLAIN: plain.ravel()}
    reply = RecordDict({"arrays": to_record(uplink), "metrics": MetricRecord(info)})
    return Message(reply, reply_to=msg)
