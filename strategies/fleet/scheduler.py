"""One training run's fleet, round by round: who is online, who trains, how the bandwidth is
split, the simulated clock (S2), and FedLaAvg's stored latest updates (S5).

The strategy asks `select` before a round (with every connected device's profile) and
`finish` after it (with the measured training seconds and payload sizes); `finish` returns
the round's `fleet` entry of metrics.jsonl: the simulated round time and clock, and each
device's T_down / T_comp / T_up. Both the clock and the stored updates are checkpoint parts
(`strategies.lora.resume`). Policies (`fleet.selection`, objects registered in
`strategies.fleet.policy.SELECTION`; a third-party one through its entry point):
- `all`: every online device, the bandwidth split evenly (the default, today's behaviour);
- `random`: `fleet.per-round` online devices uniformly (FedAvg's sampling);
- `oort`: the `fleet.per-round` online devices of largest Oort utility (never-seen first);
- `s2`: joint selection and bandwidth allocation, largest progress per simulated second;
- `fedlaavg`: the `fleet.per-round` online devices absent longest; aggregation then runs
  over every device's latest update (`LatestUpdates`; `keeps_latest_updates`).
What a policy needs of the rest of the config is checked when the config is parsed
(`FleetSection.check` asks the policy).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from strategies.fleet.model import Availability, FleetProfile, load_profiles
from strategies.fleet.policy import SELECTION, SelectionPolicy
from strategies.fleet.wireless import comm_seconds, db_to_linear
from edge_lam.config.run_config import RunConfig
from edge_lam.training.lora import State, pad_lora
from edge_lam.config.options import ConfigError

UNKNOWN = FleetProfile(speed=1.0, snr_db=20.0)


@dataclass
class Member:
    node: int
    partition: int
    profile: FleetProfile
    last_round: int = -1  # last round it trained (-1: never)
    train_s: float = float("nan")  # last measured training seconds (this machine)
    examples: int = 1  # last reported n_k
    loss: float = float("nan")  # last reported training loss


@dataclass
class RoundPlan:
    nodes: list[int]
    bandwidth_hz: dict[int, float]
    snr: dict[int, float]
    online: int


@dataclass
class FleetClock:
    policy: str
    per_round: int
    total_hz: float
    down_hz: float
    seed: int
    step_s_default: float  # predicted training seconds before any is measured
    availability: str = "always"
    profiles: dict[str, FleetProfile] = field(default_factory=dict)
    members: dict[int, Member] = field(default_factory=dict)
    clock_s: float = 0.0
    _avail: Availability | None = None
    _plan: RoundPlan | None = None
    _stepped: int = -1  # the round availability last stepped to
    _online_now: dict[int, bool] = field(default_factory=dict)  # node -> online this round

    @property
    def selection(self) -> SelectionPolicy:
        """The registered policy `fleet.selection` names."""
        return SELECTION.get(self.policy)

    @property
    def keeps_latest_updates(self) -> bool:
        """Does aggregation run over every device's latest update (`LatestUpdates`)?"""
        return getattr(self.selection, "keeps_latest_updates", False)

    def profile_of(self, device: str) -> FleetProfile:
        """A device's fleet profile; a profile the fleet does not know computes at this
        machine's speed on a 20 dB link."""
        return self.profiles.get(device, UNKNOWN)

    def join(self, node: int, partition: int, profile: FleetProfile) -> None:
        if node not in self.members:
            self.members[node] = Member(node, partition, profile)
            self._avail = None  # rebuilt with the new member

    def select(self, server_round: int, nodes: list[int], bits_up: dict[int, float]
               ) -> list[int]:
        """The devices that train this round (and their bandwidth, kept for `finish`)."""
        # partition order, not node order: a resumed simulation gives devices new node ids,
        # and every draw below (fading, the policy's) must fall on the same devices
        nodes = sorted((n for n in nodes if n in self.members),
                       key=lambda n: (self.members[n].partition, n))
        online = self._online(server_round, nodes)
        rng = np.random.default_rng([self.seed, server_round, 31])
        snr_mean = db_to_linear([self.members[n].profile.snr_db for n in nodes])
        snr = snr_mean * rng.exponential(1.0, size=len(nodes))  # Rayleigh fading
        bits = np.array([bits_up[n] for n in nodes], dtype=np.float64)
        chosen, bandwidth = self.selection.choose(self, nodes, online, snr, bits, rng)
        picked = [n for n, c in zip(nodes, chosen) if c]
        self._plan = RoundPlan(picked, {n: float(b) for n, b, c in zip(nodes, bandwidth,
                                                                      chosen) if c},
                               {n: float(s) for n, s in zip(nodes, snr)}, int(online.sum()))
        return picked

    def _online(self, server_round: int, nodes: list[int]) -> np.ndarray:
        """Who of `nodes` is online: availability evolves for every member (in partition
        order) once a round, whoever is sampled, so a device's Markov chain is its own and
        does not restart when the round's sample changes."""
        members = sorted(self.members.values(), key=lambda m: (m.partition, m.node))
        if self._avail is None or self._avail.partitions != [m.partition for m in members]:
            self._avail = Availability(self.availability, [m.partition for m in members],
                                       [m.profile for m in members], self.seed)
        if self._stepped != server_round:
            self._online_now = dict(zip((m.node for m in members),
                                        self._avail.step(server_round)))
            self._stepped = server_round
        return np.array([self._online_now[n] for n in nodes], dtype=bool)

    def predicted_comp(self, nodes: list[int]) -> np.ndarray:
        """(K,) predicted device seconds of training: the last measured (or the mean of the
        measured, or fleet.step-seconds) / speed."""
        seen = [m.train_s for m in self.members.values() if np.isfinite(m.train_s)]
        fallback = float(np.mean(seen)) if seen else self.step_s_default
        return np.array([(m.train_s if np.isfinite(m.train_s) else fallback) /
                         m.profile.speed for m in (self.members[n] for n in nodes)])

    def finish(self, server_round: int, measured: dict[int, dict]) -> dict:
        """Advance the clock by the round's simulated time. `measured[node]`: train_s,
        bits_up, bits_down, examples, loss of each device that replied."""
        plan = self._plan
        devices, slowest = [], 0.0
        for node in plan.nodes if plan else []:
            if node not in measured:
                continue
            m, got = self.members[node], measured[node]
            m.train_s, m.examples, m.loss = got["train_s"], got["examples"], got["loss"]
            m.last_round = server_round
            snr = plan.snr[node]
            down = float(comm_seconds(got["bits_down"], self.down_hz / len(plan.nodes), snr))
            comp = got["train_s"] / m.profile.speed
            up = float(comm_seconds(got["bits_up"], plan.bandwidth_hz[node], snr))
            slowest = max(slowest, down + comp + up)
            devices.append({"node_id": node, "down_s": down, "comp_s": comp, "up_s": up,
                            "bandwidth_mhz": plan.bandwidth_hz[node] / 1e6,
                            "snr_db": float(10 * np.log10(max(snr, 1e-30)))})
        self.clock_s += slowest
        return {"policy": self.policy, "online": plan.online if plan else 0,
                "selected": len(plan.nodes) if plan else 0, "round_sim_s": slowest,
                "sim_clock_s": self.clock_s, "devices": devices}

    # ----------------------------------------------------------------- checkpoint part
    entry = "fleet"  # its entry in the checkpoint (strategies.lora.resume.CheckpointPart)

    def checkpoint_state(self, name_of) -> tuple[dict, State]:
        """The clock, each member (by `name_of(node)`, its partition-based name) and a
        markov availability's random state: what an exact resume needs (JSON-able)."""
        avail = None
        if self._avail is not None:
            a = self._avail
            avail = {"partitions": list(a.partitions), "rng": a.rng.bit_generator.state,
                     "online": a.online.tolist(), "phase": a.phase.tolist()}
        return {"clock_s": self.clock_s, "availability": avail,
                "members": [{"device": name_of(n), "partition": m.partition,
                             "last_round": m.last_round, "train_s": m.train_s,
                             "examples": m.examples, "loss": m.loss}
                            for n, m in self.members.items()]}, {}

    def restore(self, saved: dict, restored) -> None:
        """Take up `checkpoint_state`: members under their placeholder node ids, with the
        fleet profile of the device each was saved as."""
        self.clock_s = float(saved["clock_s"])
        self.members = {}
        for m in saved["members"]:
            node = restored.node_of[m["device"]]
            profile = self.profile_of(restored.profiles[m["device"]]["device"])
            self.members[node] = Member(node, int(m["partition"]), profile,
                                        int(m["last_round"]), float(m["train_s"]),
                                        int(m["examples"]), float(m["loss"]))
        a = saved.get("availability")
        self._avail = None
        if a:
            by_partition = {m.partition: m.profile for m in self.members.values()}
            avail = Availability(self.availability, a["partitions"],
                                 [by_partition.get(p, UNKNOWN) for p in a["partitions"]],
                                 self.seed)
            avail.rng.bit_generator.state = a["rng"]
            avail.online = np.asarray(a["online"], dtype=bool)
            avail.phase = np.asarray(a["phase"], dtype=np.float64)
            self._avail = avail

    def move(self, old: int, new: int) -> None:
        from strategies.lora.resume import moved  # lazily: strategies.lora imports this

        if old in self.members:
            self.members = moved(self.members, old, new)
            self.members[new].node = new


def make_fleet(cfg: RunConfig) -> FleetClock:
    """The run's fleet from `fleet.*`: a bad fleet file or availability trace fails here,
    before training (the files are read when the run starts, not when the config is
    parsed)."""
    f = cfg.fleet
    profiles = load_profiles(f.file)
    for device in cfg.devices.mix:
        if device not in profiles:
            raise ConfigError(f"devices.mix names '{device}', which the fleet does not know: "
                              f"give it speed and snr_db in fleet.file")
    if f.availability not in ("always", "markov", "diurnal"):
        Availability(f.availability, [], [], cfg.seed)  # the trace file must parse
    return FleetClock(f.selection, f.per_round, f.bandwidth_mhz * 1e6, f.downlink_mhz * 1e6,
                      cfg.seed, f.step_seconds, f.availability, profiles)


class LatestUpdates:
    """FedLaAvg (S5): each device's most recent update (zero-padded to r_max) and n_k; the
    new global is the round's start plus the n_k-weighted mean of every stored update,
    stale ones included."""

    def __init__(self, r_max: int):
        self.r_max = r_max
        self.updates: dict[int, tuple[State, int]] = {}

    def store(self, node: int, sent: State, trained: State, examples: int) -> None:
        update = {k: trained[k] - sent[k] for k in trained}
        self.updates[node] = (pad_lora(update, self.r_max), int(examples))

    # ----------------------------------------------------------------- checkpoint part
    entry = "latest"  # its entry in the checkpoint (strategies.lora.resume.CheckpointPart)

    def checkpoint_state(self, name_of) -> tuple[list, State]:
        """[{device, examples}] and the updates as arrays `latest/<device>/<key>`."""
        meta = [{"device": name_of(n), "examples": int(count)}
                for n, (_, count) in self.updates.items()]
        arrays = {}
        for n, (update, _) in self.updates.items():
            arrays.update({f"latest/{name_of(n)}/{k}": v for k, v in update.items()})
        return meta, arrays

    def restore(self, saved: list | None, restored) -> None:
        for entry in saved or []:
            prefix = f"latest/{entry['device']}/"
            update = {name[len(prefix):]: np.array(v) for name, v in restored.arrays.items()
                      if name.startswith(prefix)}
            self.updates[restored.node_of[entry["device"]]] = (update, int(entry["examples"]))

    def move(self, old: int, new: int) -> None:
        from strategies.lora.resume import moved  # lazily: strategies.lora imports this

        self.updates = moved(self.updates, old, new)

    def apply(self, start: State) -> State:
        total = sum(n for _, n in self.updates.values())
        out = {k: v.copy() for k, v in start.items()}
        for update, n in self.updates.values():
            for k, v in update.items():
                out[k] = out[k] + (n / total) * v
        return out
