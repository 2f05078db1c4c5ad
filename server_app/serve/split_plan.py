"""Partitioning a model's units over the devices by dynamic programming (S8), pure math.

The model is a chain of n units (`edge_lam.serving.layers`: embedding, decoder layers, head) with
measured seconds on this machine, parameter bytes, and the bytes crossing each boundary
(`boundary_bytes[0]`: the token ids the server sends in, `[l]`: the hidden states between
unit l-1 and l, `[n]`: the logits coming out). In Flower every message goes through the
server, so a hop from device d' to d costs the uplink of d' then the downlink of d (S8 with
a star), plus `call_s`, the messaging machinery's own cost of one device call (SuperLink
round trip, serialisation; `serve.split-call-s`):

    t_comp(l, d)         = seconds(l) / speed_d                          (fleet.py)
    t_comm(l-1, d', d)   = up_d'(boundary_bytes[l]) + down_d(boundary_bytes[l]) + call_s
    DP[l][d] = min_d' DP[l-1][d'] + t_comp(l, d) + [d' != d] t_comm(l-1, d', d)   (S8)

`chain_dp` is that recursion as written (no memory limit; a device may hold several
ranges). `split_dp` adds memory: every device holds at most ONE contiguous range [i, j) of
units whose parameter bytes (a tied embedding counted once when one device holds the whole
model) plus `work_bytes` of activations fit its `memory_mib`. Because the hop cost splits
into the sender's uplink and the receiver's downlink, the DP runs over (units done, which
devices are used) with the result back at the server:

    G[S + e][j] = min_{i < j} G[S][i] + down_e(b_i) + t_comp([i, j), e) + up_e(b_j) + call_s,
                  over devices e not in S with bytes([i, j)) <= memory_e

and the plan is min_S G[S][n]. Devices with identical profiles are interchangeable, so S
counts the devices used per profile (4 x rpi4: 5 states, not 16). `choose` falls back to
the best single device whenever splitting does not predict strictly less time (one request
goes through the chain sequentially: splitting only pays when memory forces it or links
are fast and a faster device takes over part of the work).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from server_app.serve.fleet import ServeDevice
from edge_lam.config.options import ConfigError, RunAborted

MIB = 2 ** 20
MAX_STATES = 1 << 16  # profile-count states the exact DP may visit


@dataclass(frozen=True)
class UnitCosts:
    seconds: tuple[float, ...]  # (n,) measured on this machine
    param_bytes: tuple[int, ...]  # (n,)
    boundary_bytes: tuple[int, ...]  # (n + 1,) into unit 0, between units, out of unit n-1
    tied_bytes: int = 0  # shared by unit 0 and unit n-1 (tied embedding)
    work_bytes: int = 0  # activations a device needs besides its parameters
    call_s: float = 0.0  # messaging cost of one device call, whatever the device

    def __post_init__(self) -> None:
        n = len(self.seconds)
        if not n or len(self.param_bytes) != n or len(self.boundary_bytes) != n + 1:
            raise ValueError(f"unit costs: {n} seconds, {len(self.param_bytes)} parameter "
                             f"sizes and {len(self.boundary_bytes)} boundaries; need n, n "
                             "and n + 1 with n >= 1")

    @property
    def n(self) -> int:
        return len(self.seconds)

    def segment_bytes(self, start: int, end: int) -> int:
        shared = self.tied_bytes if (start == 0 and end == self.n) else 0
        return int(sum(self.param_bytes[start:end])) - shared + self.work_bytes


@dataclass(frozen=True)
class Segment:
    device: int  # index into the fleet
    start: int  # first unit
    end: int  # one past the last unit


@dataclass(frozen=True)
class Plan:
    segments: tuple[Segment, ...]
    seconds: float  # predicted latency of one batch
    how: str  # 'dp', 'single', 'fixed', 'chain-dp'


def fits(costs: UnitCosts, device: ServeDevice, start: int, end: int) -> bool:
    return costs.segment_bytes(start, end) <= device.memory_mib * MIB


def segment_seconds(costs: UnitCosts, device: ServeDevice, start: int, end: int) -> float:
    """Server -> device (b_start), units [start, end) on the device, device -> server."""
    compute = device.compute_s(float(sum(costs.seconds[start:end])))
    return (device.send_s(costs.boundary_bytes[start], up=False) + compute
            + device.send_s(costs.boundary_bytes[end], up=True) + costs.call_s)


def check_segments(costs: UnitCosts, devices: list[ServeDevice],
                   segments: tuple[Segment, ...] | list[Segment]) -> None:
    """Raise ConfigError unless the segments cover units 0..n-1 in order, each device at
    most once, each within its memory."""
    where = 0
    for seg in segments:
        if not 0 <= seg.device < len(devices):
            raise ConfigError(f"split plan names device {seg.device}: the fleet has "
                              f"{len(devices)} (0..{len(devices) - 1})")
        if seg.start != where or seg.end <= seg.start:
            raise ConfigError(f"split plan: a range starts at unit {seg.start}, expected "
                              f"{where}; ranges must cover units 0..{costs.n - 1} in order")
        if not fits(costs, devices[seg.device], seg.start, seg.end):
            raise ConfigError(
                f"split plan: units [{seg.start}, {seg.end}) need "
                f"{costs.segment_bytes(seg.start, seg.end) / MIB:.1f} MiB but device "
                f"'{devices[seg.device].name}' has {devices[seg.device].memory_mib:g} MiB: "
                "give it fewer units")
        where = seg.end
    if where != costs.n:
        raise ConfigError(f"split plan ends at unit {where}; the model has {costs.n} units")
    used = [s.device for s in segments]
    if len(set(used)) != len(used):
        raise ConfigError("split plan: a device holds more than one range; give each device "
                          "one contiguous range")


def plan_seconds(costs: UnitCosts, devices: list[ServeDevice],
                 segments: tuple[Segment, ...]) -> float:
    return float(sum(segment_seconds(costs, devices[s.device], s.start, s.end)
                     for s in segments))


def fixed_plan(costs: UnitCosts, devices: list[ServeDevice], segments: list[Segment],
               how: str = "fixed") -> Plan:
    check_segments(costs, devices, segments)
    return Plan(tuple(segments), plan_seconds(costs, devices, tuple(segments)), how)


def best_single(costs: UnitCosts, devices: list[ServeDevice]) -> Plan | None:
    """The fastest device that holds the whole model, or None when none does."""
    options = [Plan((Segment(d, 0, costs.n),), segment_seconds(costs, dev, 0, costs.n),
                    "single") for d, dev in enumerate(devices) if fits(costs, dev, 0, costs.n)]
    return min(options, key=lambda p: p.seconds) if options else None


def chain_dp(costs: UnitCosts, devices: list[ServeDevice]) -> Plan:
    """The S8 recursion DP[l][d] as written: no memory limit, revisits allowed."""
    n, k = costs.n, len(devices)
    comp = np.array([[d.compute_s(t) for d in devices] for t in costs.seconds])  # (n, k)
    up = np.array([[d.send_s(b, up=True) for d in devices] for b in costs.boundary_bytes])
    down = np.array([[d.send_s(b, up=False) for d in devices] for b in costs.boundary_bytes])
    dp = np.zeros((n, k))
    back = np.zeros((n, k), dtype=int)
    dp[0] = down[0] + comp[0] + costs.call_s
    for l in range(1, n):
        hop = up[l][:, None] + down[l][None, :] + costs.call_s  # (d', d)
        np.fill_diagonal(hop, 0.0)
        total = dp[l - 1][:, None] + hop  # (d', d)
        back[l] = total.argmin(axis=0)
        dp[l] = total.min(axis=0) + comp[l]
    last = int((dp[-1] + up[n]).argmin())
    owner = [last]
    for l in range(n - 1, 0, -1):
        owner.append(int(back[l][owner[-1]]))
    owner.reverse()
    cuts = [0] + [l for l in range(1, n) if owner[l] != owner[l - 1]] + [n]
    segments = tuple(Segment(owner[a], a, b) for a, b in itertools.pairwise(cuts))
    return Plan(segments, float(dp[-1][last] + up[n][last]), "chain-dp")


def _profiles(devices: list[ServeDevice]) -> list[list[int]]:
    """Indices of the devices grouped by identical speed, memory and link."""
    groups: dict[tuple, list[int]] = {}
    for i, d in enumerate(devices):
        groups.setdefault((d.speed, d.memory_mib, d.up_mbps, d.down_mbps, d.latency_s),
                          []).append(i)
    return list(groups.values())


def _segment_table(costs: UnitCosts, device: ServeDevice) -> np.ndarray:
    """(n + 1, n + 1): seconds of segment [i, j) on `device`, inf where i >= j or it does
    not fit."""
    n = costs.n
    cum = np.concatenate([[0.0], np.cumsum(costs.seconds)])
    down = np.array([device.send_s(b, up=False) for b in costs.boundary_bytes])
    up = np.array([device.send_s(b, up=True) for b in costs.boundary_bytes])
    table = (down[:, None] + (cum[None, :] - cum[:, None]) / device.speed + up[None, :]
             + costs.call_s)
    for i in range(n + 1):
        for j in range(n + 1):
            if j <= i or not fits(costs, device, i, j):
                table[i, j] = np.inf
    return table


def split_dp(costs: UnitCosts, devices: list[ServeDevice]) -> Plan:
    """The memory-aware DP over (units done, devices used per profile); see the module."""
    groups = _profiles(devices)
    radix = np.cumprod([1] + [len(g) + 1 for g in groups])
    states = int(radix[-1])
    if states > MAX_STATES:
        raise ConfigError(f"the fleet has {len(groups)} distinct device profiles: the exact "
                          f"split DP would visit {states} states; group devices by profile")
    tables = [_segment_table(costs, devices[g[0]]) for g in groups]
    n = costs.n
    best = np.full((states, n + 1), np.inf)
    best[0, 0] = 0.0
    back: dict[tuple[int, int], tuple[int, int, int]] = {}  # (s, j) -> (prev s, group, i)
    for s in range(states):
        used = (s // radix[:-1]) % (radix[1:] // radix[:-1])
        if not np.isfinite(best[s]).any():
            continue
        for g in range(len(groups)):
            if used[g] == len(groups[g]):
                continue
            cand = best[s][:, None] + tables[g]  # (i, j)
            start = cand.argmin(axis=0)
            value = cand.min(axis=0)
            nxt = s + int(radix[g])
            better = value < best[nxt] - 1e-15
            best[nxt][better] = value[better]
            for j in np.nonzero(better)[0]:
                back[(nxt, int(j))] = (s, g, int(start[j]))
    count = [int(((s // radix[:-1]) % (radix[1:] // radix[:-1])).sum()) for s in range(states)]
    order = sorted(range(1, states), key=lambda s: (best[s][n], count[s]))
    if not np.isfinite(best[order[0]][n]):
        raise RunAborted(f"the model ({costs.segment_bytes(0, n) / MIB:.0f} MiB with "
                         "activations) does not fit the fleet's memory, even split over "
                         "every device: add devices or memory (serve.fleet)")
    return Plan(_backtrack(back, groups, radix, order[0], n), float(best[order[0]][n]), "dp")


def _backtrack(back, groups, radix, state: int, n: int) -> tuple[Segment, ...]:
    spans, j = [], n
    while j > 0:
        state, g, i = back[(state, j)]
        spans.append((g, i, j))
        j = i
    spans.reverse()
    taken = [0] * len(groups)
    segments = []
    for g, i, j in spans:
        segments.append(Segment(groups[g][taken[g]], i, j))
        taken[g] += 1
    return tuple(segments)


def even_segments(n: int, devices: list[int]) -> list[Segment]:
    """Units split as evenly as possible over `devices`, in that order (a naive baseline)."""
    cuts = np.linspace(0, n, len(devices) + 1).round().astype(int)
    return [Segment(d, int(a), int(b)) for d, a, b in zip(devices, cuts, cuts[1:])]


def parse_plan(text: str) -> list[Segment]:
    """'0:0-12,2:12-32': device index : unit range [start-end) per stage."""
    segments = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            device, span = part.split(":")
            start, end = span.split("-")
            segments.append(Segment(int(device), int(start), int(end)))
        except ValueError as err:
            raise ConfigError(f"serve.split-plan item '{part}' must read "
                              "<device>:<start>-<end>, e.g. '0:0-12,1:12-32'") from err
    if not segments:
        raise ConfigError("serve.split-plan is empty: use 'dp', 'single' or a list of ranges")
    return segments


def choose(costs: UnitCosts, devices: list[ServeDevice], how: str) -> tuple[Plan, dict]:
    """The plan to run (`how`: 'dp' with the single-device fallback, 'single', or fixed
    ranges) and what it was compared with: {'dp', 'single'} predicted seconds."""
    single = best_single(costs, devices)
    compared = {"single": single.seconds if single else None}
    if how == "single":
        if single is None:
            raise RunAborted("serve.split-plan='single': no device of the fleet holds the "
                             "whole model; use 'dp' to split it")
        return single, compared
    if how == "dp":
        dp = split_dp(costs, devices)
        compared["dp"] = dp.seconds
        compared["fallback"] = single is not None and single.seconds <= dp.seconds * (1 + 1e-9)
        if compared["fallback"]:
            return single, compared  # splitting does not pay: one device
        return dp, compared
    return fixed_plan(costs, devices, parse_plan(how)), compared
