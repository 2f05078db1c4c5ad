"""The device side of SecAgg+ (`strategies.secure.protocol`): three QUERY `secagg` stages
and a Flower mod on TRAIN messages.

- QUERY `secagg`, config `stage`:
  - `setup` (round, devices, k, threshold): checked (`protocol.check_setup`), two fresh
    X25519 key pairs; reply: the two public keys;
  - `share` (the public keys of the devices that answered): shares of a fresh self-mask
    seed and of the s-key over the neighbourhood that answered, each encrypted to its
    holder; reply: destinations and ciphertexts;
  - `unmask` (who survived, who dropped): the shares the server may have (never both of one
    device); then this round's secrets are wiped.
- TRAIN whose config has `secagg-stage='mask'` (`secagg_mod`): the algorithm's handler
  trains as always; the mod takes its reply's adapter (`secure.encoding`, the layout the
  server named) and any integer vector the handler left under `secagg.plain` (the sub-model
  rows), masks them (`protocol.masked`) and sends only `secagg.masked` up, never the
  adapter. A second masked TRAIN for a round is refused: its masks would repeat.

Everything between stages lives in `context.state` (the SuperNode keeps it for the run
while it starts a fresh ClientApp process per message).
"""

from __future__ import annotations

import os

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, \
    RecordDict

from edge_lam.logs import get_logger
from edge_lam.records import from_record, to_record
from strategies.secure import encoding
from strategies.secure.protocol import (Refused, agree, check_setup, check_unmask,
                                        fernet_key, masked, new_key_pair, purpose, seal,
                                        split, unseal)

log = get_logger()

STATE = "secagg"  # context.state record
PLAIN = "secagg.plain"  # a handler's extra integer vector (uint64) to add to the sum
MASKED = "secagg.masked"  # the only array a masked TRAIN reply carries
STAGE = "secagg-stage"  # TRAIN config: 'mask'


def _state(context: Context) -> dict:
    record = context.state.config_records.get(STATE)
    return dict(record) if record is not None else {}


def _save(context: Context, state: dict) -> None:
    context.state.config_records[STATE] = ConfigRecord(state)


def _expect(state: dict, stage: str, server_round: int) -> None:
    if state.get("stage") != stage or int(state.get("round", -1)) != server_round:
        raise Refused(f"secure aggregation: round {server_round} is not at the '{stage}' "
                      f"stage on this device (it is at '{state.get('stage', 'none')}' of "
                      f"round {state.get('round', '-')}): refused")


def handle(msg: Message, context: Context) -> Message:
    """QUERY `secagg`: one stage (setup, share, unmask); Refused raises (an error reply)."""
    config = msg.content["config"]
    stage, server_round = str(config["stage"]), int(config["server-round"])
    state = _state(context)
    me = context.node_id
    if stage == "setup":
        masked_rounds = [int(r) for r in state.get("masked-rounds", [])]
        if server_round in masked_rounds:
            raise Refused(f"secure aggregation set up again for round {server_round}, which "
                          "this device already masked: refused (its input would be masked "
                          "twice for one round)")
        devices = [int(d) for d in config["devices"]]
        k, t = int(config["neighbours"]), int(config["threshold"])
        check_setup(devices, me, k, t)
        sk_c, pk_c = new_key_pair()
        sk_s, pk_s = new_key_pair()
        _save(context, {"stage": "setup", "round": server_round, "devices": devices,
                        "k": k, "t": t, "sk-c": sk_c, "sk-s": sk_s, "pk-c": pk_c,
                        "pk-s": pk_s, "masked-rounds": masked_rounds})
        out = {"pk-c": pk_c, "pk-s": pk_s}
    elif stage == "share":
        _expect(state, "setup", server_round)
        out = _share(state, config, me, context.run_id, server_round)
        _save(context, state)
    elif stage == "unmask":
        _expect(state, "masked", server_round)
        out = _unmask(state, config)
        _save(context, {"masked-rounds": state["masked-rounds"], "stage": "done",
                        "round": server_round})  # this round's secrets are gone
    else:
        raise ValueError(f"unknown secure aggregation stage '{stage}'")
    return Message(RecordDict({"config": ConfigRecord(out)}), reply_to=msg)


def _share(state: dict, config: ConfigRecord, me: int, run_id: int, server_round: int
           ) -> dict:
    ids = [int(i) for i in config["ids"]]
    pk_c, pk_s = list(config["pk-c"]), list(config["pk-s"])
    if len(set(ids)) != len(ids) or not set(ids) <= set(state["devices"]):
        raise Refused("the server's key list repeats a device or names one outside the "
                      "round: refused")
    keys = dict(zip(ids, zip(pk_c, pk_s)))
    if keys.get(me) != (state["pk-c"], state["pk-s"]):
        raise Refused("the server's key list does not hold this device's own keys: refused")
    if len(set(pk_c + pk_s)) != 2 * len(ids):
        raise Refused("the server's key list repeats a public key: refused")
    near = check_setup(state["devices"], me, int(state["k"]), int(state["t"]))
    alive = [v for v in near if v in keys]
    holders = sorted(alive + [me])
    t = int(state["t"])
    if len(holders) < t:
        raise Refused(f"{len(holders)} of this device's neighbourhood answered, under the "
                      f"threshold {t}: refused")
    seed = os.urandom(32)  # the self-mask seed b
    b_shares = split(seed, t, holders)
    sk_shares = split(state["sk-s"], t, holders)
    info = purpose("share", run_id, server_round)
    dsts, cts = [], []
    for v in alive:
        key = fernet_key(state["sk-c"], keys[v][0], info)
        dsts.append(v)
        cts.append(seal(me, v, b_shares[v], sk_shares[v], key))
    state.update({"stage": "share", "seed": seed, "peer-ids": alive,
                  "peer-pk-c": [keys[v][0] for v in alive],
                  "peer-pk-s": [keys[v][1] for v in alive],
                  "held-ids": [me], "held-b": [b_shares[me]], "held-sk": [sk_shares[me]]})
    return {"dst": dsts, "ciphertext": cts}


def _unmask(state: dict, config: ConfigRecord) -> dict:
    survived = [int(v) for v in config["survived"]]
    dropped = [int(v) for v in config["dropped"]]
    held = [int(v) for v in state["held-ids"]]
    check_unmask(held, survived, dropped, int(state["t"]))
    b = dict(zip(held, state["held-b"]))
    sk = dict(zip(held, state["held-sk"]))
    b_ids = [v for v in survived if v in b]
    sk_ids = [v for v in dropped if v in sk]
    return {"b-ids": b_ids, "b-shares": [b[v] for v in b_ids],
            "sk-ids": sk_ids, "sk-shares": [sk[v] for v in sk_ids]}


def round_devices(context: Context) -> int:
    """How many devices the round this device set up names (a bound for fixed points)."""
    return len(_state(context).get("devices", [])) or 1


def mask_input(context: Context, config: ConfigRecord, plain: np.ndarray) -> np.ndarray:
    """This device's masked input for the round the TRAIN config names (uint64), from its
    plain integer vector; takes the shares the server routed and marks the round masked."""
    server_round = int(config["server-round"])
    state = _state(context)
    _expect(state, "share", server_round)
    me = context.node_id
    peers = dict(zip([int(v) for v in state["peer-ids"]],
                     zip(state["peer-pk-c"], state["peer-pk-s"])))
    srcs = [int(v) for v in config.get("secagg-src", [])]
    cts = list(config.get("secagg-ciphertext", []))
    if len(set(srcs)) != len(srcs) or not set(srcs) <= set(peers):
        raise Refused("shares routed from a device twice or from outside this device's "
                      "neighbourhood: refused")
    share_info = purpose("share", context.run_id, server_round)
    held_ids, held_b, held_sk = list(state["held-ids"]), list(state["held-b"]), \
        list(state["held-sk"])
    for src, ct in zip(srcs, cts):
        b_share, sk_share = unseal(ct, fernet_key(state["sk-c"], peers[src][0], share_info),
                                   src, me)
        held_ids.append(src)
        held_b.append(b_share)
        held_sk.append(sk_share)
    t = int(state["t"])
    if len(held_ids) < t:
        raise Refused(f"shares of {len(held_ids)} devices of this neighbourhood arrived, "
                      f"under the threshold {t}: refused")
    mask_info = purpose("mask", context.run_id, server_round)
    pair_keys = {v: agree(state["sk-s"], peers[v][1], mask_info) for v in srcs}
    out = masked(plain, state["seed"], pair_keys, me)
    state.update({"stage": "masked", "held-ids": held_ids, "held-b": held_b,
                  "held-sk": held_sk,
                  "masked-rounds": [int(r) for r in state["masked-rounds"]] + [server_round]})
    for key in ("seed", "sk-c", "peer-pk-c"):  # no longer needed on this device
        state.pop(key, None)
    _save(context, state)
    return out


def secagg_mod(msg: Message, context: Context, call_next) -> Message:
    """A Flower mod on TRAIN: a reply's adapter (and `secagg.plain`) goes up masked."""
    config = msg.content.config_records.get("config")
    if (msg.metadata.message_type.split(".")[0] != MessageType.TRAIN or config is None
            or config.get(STAGE) != "mask"):
        return call_next(msg, context)
    reply = call_next(msg, context)
    if reply.has_error() or "arrays" not in reply.content.array_records:
        return reply
    payload = from_record(reply.content["arrays"])
    metrics = reply.content.metric_records.get("metrics", MetricRecord())
    extra = payload.pop(PLAIN, None)
    layout = str(config.get("secagg-layout", "padded"))
    parts, clipped = [], 0
    if layout != "none":
        weight = 1 if config.get("secagg-weight") == "uniform" else int(metrics["num-examples"])
        vector, clipped = encoding.encode(payload, weight,
                                          int(config["r-max"]), layout,
                                          float(config["secagg-clip"]))
        parts.append(vector.view(np.uint64))
        payload = {}
    if extra is not None:
        parts.append(np.asarray(extra, np.uint64).ravel())
    if not parts:  # nothing of the handler's goes into the sum (rows withheld): as it is
        return reply
    out = mask_input(context, config, np.concatenate(parts))
    if clipped:
        log.warning("node %d: %d entries of the update clipped to +-%s for secure "
                    "aggregation (raise secure.clip)", context.node_id, clipped,
                    config["secagg-clip"])
    arrays: ArrayRecord = to_record({**payload, MASKED: out})
    content = RecordDict({"arrays": arrays, "metrics": metrics})
    for name, rec in reply.content.config_records.items():
        content.config_records[name] = rec
    return Message(content, reply_to=msg)
