"""Talking to devices, for every app mode: who is who (QUERY), one message per device.

- `query_profiles`: ask devices (one Flower QUERY each, no model attached) to describe
  themselves: profile, partition, explicit LoRA rank, task; devices reply from their
  `--node-config` (client_app.app's default query handler). A QUERY whose config says
  `measure` (`fleet.rank-from='capability'`) also gets what the device measured: free memory,
  seconds per step, its model's footprint (`edge_lam.training.capability.report`).
- `unicast`: one message per device, each with its own content (a per-rank truncation, a
  projected update, a batch of prompts...).
- `origin`: which device a reply is about, also for error replies the SuperLink writes itself
  for a device that vanished (they come from the SuperLink's node id).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from edge_lam.training import capability
from edge_lam.training.device import DeviceInfo
from edge_lam.logs import get_logger
from edge_lam.config.options import ConfigError
from edge_lam.training.overhead import platform_fields

log = get_logger()

def profile_reply(node_config: Mapping, msg: Message) -> Message:
    """A device's answer to a profile QUERY, from its `--node-config` (defaults if absent);
    when the QUERY's config says `measure` and the device has no explicit lora-rank, with
    its measurements (free-memory-mib, step-s, ...: `edge_lam.training.capability.report`)."""
    info = DeviceInfo.from_node_config(node_config)
    fields = {"device": info.device, "partition-id": info.partition_id,
              "num-partitions": info.num_partitions, "lora-rank": info.lora_rank,
              "task": info.task, **platform_fields()}
    ask = msg.content.config_records.get("config")
    if ask is not None and ask.get("measure", False) and info.lora_rank <= 0:
        fields |= capability.report(node_config, info, ask)
        log.info("device measured: %.0f MiB free, %.4f s per step at rank %d%s",
                 fields["free-memory-mib"], fields["step-s"], fields["step-rank"],
                 " (simulated: the fleet model stands in)" if fields["simulated"] else "")
    return Message(RecordDict({"profile": ConfigRecord(fields)}), reply_to=msg)


def query_profiles(grid: Grid, node_ids: Iterable[int], timeout: float,
                   make: Callable[[int, ConfigRecord], object],
                   ask: Mapping | None = None) -> dict[int, object]:
    """{node: make(node, its profile record)} for the devices that answered in time; a
    device whose profile `make` refuses (ConfigError) is logged and left out. `ask` is the
    QUERY's config (e.g. `measure`, see `profile_reply`)."""
    queries = [Message(RecordDict({"config": ConfigRecord(dict(ask or {}))}), dst_node_id=n,
                       message_type=MessageType.QUERY) for n in node_ids]
    out = {}
    for reply in grid.send_and_receive(queries, timeout=timeout) if queries else []:
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.error("node %d did not describe itself: %s", node, reply.error.reason)
            continue
        try:
            out[node] = make(node, reply.content["profile"])
        except ConfigError as err:
            log.error("node %d is left out: %s", node, err)
    return out


def connected_by_partition(grid: Grid, timeout: float, min_devices: int, required: int,
                           timeout_key: str) -> list[int]:
    """The connected devices ordered by partition id: waits up to `timeout` seconds for
    `min_devices` of them and refuses (ConfigError) fewer than `required`, or none that
    describes itself; `timeout_key` names the timeout in the errors."""
    deadline = time.monotonic() + timeout
    nodes = list(grid.get_node_ids())
    while len(nodes) < min_devices and time.monotonic() < deadline:
        time.sleep(1.0)
        nodes = list(grid.get_node_ids())
    if len(nodes) < max(required, 1):
        raise ConfigError(f"only {len(nodes)} device(s) connected within {timeout_key}="
                          f"{timeout:g} s; {required} needed (min-devices={min_devices}): "
                          "start more SuperNodes or lower min-devices")
    parts = query_profiles(grid, nodes, timeout, lambda node, p: int(p["partition-id"]))
    if not parts:
        raise ConfigError(f"none of the {len(nodes)} connected device(s) described itself "
                          f"within {timeout_key}={timeout:g} s: check the SuperNodes' logs")
    return sorted(parts, key=lambda n: (parts[n], n))


def unicast(node_ids: Iterable[int], message_type: str,
            content: Callable[[int], RecordDict]) -> list[Message]:
    """One message per node, each with its own content."""
    return [Message(content(node), dst_node_id=node, message_type=message_type)
            for node in node_ids]


def origin(msg: Message, sent: Iterable[Message]) -> int:
    """The device a reply is about: its sender, or, for an error the SuperLink wrote itself
    (no heartbeat), the destination of the message it answers."""
    by_id = {m.metadata.message_id: m.metadata.dst_node_id for m in sent
             if m.metadata.message_id}
    return by_id.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
