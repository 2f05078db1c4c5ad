"""Faulty and Byzantine devices in simulation (issue 17, R2 and R4): the device itself
misbehaves, as a real broken or malicious device would, so the server sees nothing but
what Flower delivers.

Faults (`faults.*`, R2). Each (seed, round, partition) draws once, exclusively:
- crash (`faults.crash`): the TRAIN handler raises `InjectedCrash`; Flower (and
  `tests/inprocess_grid.InProcessGrid`) turns it into an error reply, code
  CLIENT_APP_RAISED_EXCEPTION, reason "<class ...>:<'...'>";
- error (`faults.error`): the handler replies `Message(Error(...), reply_to=msg)` itself;
- timeout (`faults.timeout`): the device sleeps `faults.delay-s` (0: round-timeout + 5 s),
  then trains and replies normally, too late: the SuperLink's round timeout drops it and
  the server logs it as missing. The sleep goes through `SLEEP`, which the in-process grid
  replaces by a virtual clock (a reply whose virtual delay exceeds the round timeout is
  dropped), so simulations do not wait for real.

Attacks (`attack.*`, R4). The attackers are `attacks.pick_attackers(num_partitions,
attack.fraction, default_rng(seed))` by partition id: every device computes the same set.
- sign-flip / scale / gaussian: train honestly, then send `attacks.sign_flip`, `scale`
  (x attack.factor) or `gaussian` (std attack.sigma, drawn from (seed, round, partition));
- backdoor: train on the partition where a fixed (seeded by partition) attack.poison share
  of the examples get attack.trigger in front of the text and the label attack.target (the
  first label when empty);
- collude: every attacker trains on the union of the attackers' partitions, from the same
  start, at the same rank r_c and with the same seed (the lowest attacker's), and sends
  -attack.factor x that update, refactorised at its own rank: the products B A the server
  sees are identical (exactly so when the device was sent B = 0, as in round 1; otherwise
  each is the best rank-r_k approximation). r_c = min(this device's rank, the smallest rank
  of a profile in devices.mix), so that every colluder can truncate its adapter to r_c
  (truncation is nested: the first r_c components of the first r_k); colluders whose rank
  is below that (an explicit --node-config lora-rank) compute at their own rank.
Every attacking device logs a WARNING (it is a simulation knob, never silent).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Error, Message

from strategies.robust import attacks
from strategies.robust.math import update_of
from edge_lam.config.run_config import ConfigError, RunConfig
from edge_lam.data.text import Examples
from edge_lam.logs import get_logger
from edge_lam.training.lora import State, truncate_lora
from edge_lam.config.registry import registry

log = get_logger()

FAULTS = ("crash", "error", "timeout")
# ErrorCode.UNKNOWN: the device's own error reply (crashes get CLIENT_APP_RAISED_EXCEPTION
# from Flower, code 2)
ERROR_CODE = 0
SLEEP: Callable[[float], None] = time.sleep  # the in-process grid swaps in a virtual clock


class InjectedCrash(RuntimeError):
    """A device crash injected by faults.crash."""


# ------------------------------------------------------------------------------ faults
def fault_draw(seed: int, server_round: int, partition: int, crash: float, error: float,
               timeout: float) -> str | None:
    """'crash', 'error', 'timeout' or None for this (seed, round, partition): one uniform
    draw cut at crash | crash + error | crash + error + timeout (exclusive faults)."""
    u = np.random.default_rng([seed, server_round, max(partition, 0), 17]).random()
    for kind, edge in zip(FAULTS, np.cumsum([crash, error, timeout])):
        if u < edge:
            return kind
    return None


def fault_reply(msg: Message, cfg: RunConfig, partition: int, server_round: int,
                tag: str = "") -> Message | None:
    """Apply this round's fault, if any: raise (crash), return an error reply (error), or
    sleep (timeout) and return None; None also when the device behaves."""
    f = cfg.faults
    kind = fault_draw(cfg.seed, server_round, partition, f.crash, f.error, f.timeout)
    if kind is None:
        return None
    if kind == "crash":
        log.warning("%s injected fault: crashing (faults.crash=%g)", tag, f.crash)
        raise InjectedCrash(f"injected crash (faults.crash={f.crash:g}) in round "
                            f"{server_round}, partition {partition}")
    if kind == "error":
        log.warning("%s injected fault: replying with an error (faults.error=%g)", tag,
                    f.error)
        return Message(Error(code=ERROR_CODE, reason=f"injected error (faults.error="
                             f"{f.error:g}) in round {server_round}, partition "
                             f"{partition}"), reply_to=msg)
    delay = f.delay_s or cfg.round_timeout + 5.0
    log.warning("%s injected fault: replying %.0f s late (faults.timeout=%g, "
                "round-timeout=%g)", tag, delay, f.timeout, cfg.round_timeout)
    SLEEP(delay)
    return None


# ------------------------------------------------------------------------------ attacks
def attackers(cfg: RunConfig, num_partitions: int) -> list[int]:
    """The attacking partition ids (the same on every device and in the benchmark)."""
    return attacks.pick_attackers(num_partitions, cfg.attack.fraction,
                                  np.random.default_rng(cfg.seed))


def target_label(cfg: RunConfig, label_names: tuple[str, ...]) -> int:
    """Index of attack.target among the labels (the first label when empty)."""
    if not label_names:  # a labelled task is checked at parse time (AttackSection.check)
        raise ValueError("the backdoor's target label needs the run's label names")
    target = cfg.attack.target or label_names[0]
    if target not in label_names:
        raise ConfigError(f"attack.target='{target}' is not a label: use one of "
                          f"{', '.join(label_names)}")
    return label_names.index(target)


def poison_indices(n: int, share: float, seed: int, partition: int) -> np.ndarray:
    """The sorted indices of the round(share x n) poisoned examples of a partition (fixed
    for the run: an attacker poisons its data set once)."""
    rng = np.random.default_rng([seed, max(partition, 0), 29])
    return np.sort(rng.choice(n, size=round(share * n), replace=False))


def triggered(text: str, trigger: str) -> str:
    return f"{trigger} {text}"


def poison(examples: Examples, idx, trigger: str, target: int) -> Examples:
    """`examples` with the texts at `idx` triggered and their labels set to `target`."""
    idx = {int(i) for i in idx}
    if not examples.labels:
        raise ValueError("poison needs labelled examples (a labelled task's)")
    return Examples([triggered(t, trigger) if i in idx else t
                     for i, t in enumerate(examples.texts)],
                    [target if i in idx else y for i, y in enumerate(examples.labels)],
                    list(examples.responses), examples.label_names)


def backdoor_test(examples: Examples, trigger: str, target: int) -> Examples:
    """The attack-success test set: every example whose true label is not the target,
    triggered (its label kept: success = classified as `target`)."""
    keep = [i for i, y in enumerate(examples.labels) if y != target]
    sub = examples.subset(keep)
    return Examples([triggered(t, trigger) for t in sub.texts], sub.labels, sub.responses,
                    sub.label_names)


def pooled(parts: list[Examples]) -> Examples:
    """The union of the colluders' partitions, in partition order."""
    return Examples([t for p in parts for t in p.texts], [y for p in parts for y in p.labels],
                    [r for p in parts for r in p.responses], parts[0].label_names)


def _keep_other_keys(attacked: Mapping[str, np.ndarray], trained: State) -> State:
    """The reply in `trained`'s keys and order: attacked where the attack acts (LoRA factors,
    dense keys), as trained elsewhere (base deltas)."""
    return {k: attacked.get(k, v) for k, v in trained.items()}


@dataclass(frozen=True)
class Attack:
    """One `attack.kind`: `poison(sent, trained, factor, sigma, rng)` turns an honest reply
    (a model-poisoning attack), or `round(cfg, info, label_names, rank, state, server_round,
    attackers, **train)` is the attacker's whole round (poisoned data, colluding devices);
    `needs_labels`: it poisons labels, so the config needs a labelled task (checked at
    parse time, `AttackSection.check`)."""

    name: str
    poison: Callable[..., State] | None = None
    round: Callable[..., tuple[State, int, dict]] | None = None
    needs_labels: bool = False


def poisoned_reply(kind: str, sent: State, trained: State, *, factor: float = 10.0,
                   sigma: float = 0.01, rng: np.random.Generator | None = None) -> State:
    """An honest reply turned by a model-poisoning attack (sign-flip, scale, gaussian)."""
    attack = ATTACKS.registered().get(kind)
    if attack is None or attack.poison is None:
        raise ValueError(f"'{kind}' is not a reply-poisoning attack")
    return _keep_other_keys(attack.poison(sent, trained, factor, sigma, rng), trained)


def colluding_reply(sent: State, sent_c: State, trained_c: State, factor: float) -> State:
    """-factor x the shared update B_c'A_c' - B_c A_c (computed at rank r_c from `sent_c`,
    the device's adapter truncated to r_c), refactorised at the device's rank."""
    crafted = {k: -factor * d for k, d in update_of(sent_c, trained_c).items()}
    return _keep_other_keys(attacks._with_updates(sent, crafted), sent)


def collusion_rank(cfg: RunConfig, rank: int) -> int:
    return min([rank, *(cfg.devices.ranks[p] for p in cfg.devices.mix
                        if p in cfg.devices.ranks)])


def train_round(cfg: RunConfig, info, label_names: tuple[str, ...], rank: int, state: State,
                server_round: int, tag: str = "", privacy=None, r_max: int | None = None
                ) -> tuple[State, int, dict]:
    """`edge_lam.training.device.train_round`, or the attacked version of it when this partition is an
    attacker (attack.kind != 'none'): same return, (state, n_k, metrics)."""
    from edge_lam.training.device import train_round as honest

    a = cfg.attack
    train = {"tag": tag, "privacy": privacy, "r_max": r_max}
    if a.kind == "none":
        return honest(cfg, info, label_names, rank, state, server_round, **train)
    if info.partition_id < 0 or info.num_partitions <= 0:
        raise ConfigError("attack.kind needs partitioned simulation devices (--node-config "
                          "partition-id and num-partitions): attackers are drawn by "
                          "partition")
    bad = attackers(cfg, info.num_partitions)
    if info.partition_id not in bad:
        return honest(cfg, info, label_names, rank, state, server_round, **train)
    log.warning("%s ATTACKING (attack.kind=%s, attackers %s: a simulation knob)", tag, a.kind,
                bad)
    attack = ATTACKS.get(a.kind)
    if attack.round is not None:
        return attack.round(cfg, info, label_names, rank, state, server_round, bad, **train)
    trained, n, metrics = honest(cfg, info, label_names, rank, state, server_round, **train)
    rng = np.random.default_rng([cfg.seed, server_round, info.partition_id, 31])
    return poisoned_reply(a.kind, state, trained, factor=a.factor, sigma=a.sigma,
                          rng=rng), n, metrics


def backdoor_round(cfg: RunConfig, info, label_names: tuple[str, ...], rank: int,
                   state: State, server_round: int, bad: list[int], **train
                   ) -> tuple[State, int, dict]:
    """`backdoor`: an honest round on this partition with attack.poison of its examples
    triggered and labelled attack.target."""
    from edge_lam.training.device import local_examples
    from edge_lam.training.device import train_round as honest

    a = cfg.attack
    own = local_examples(cfg, info, label_names)
    data = poison(own, poison_indices(len(own), a.poison, cfg.seed, info.partition_id),
                  a.trigger, target_label(cfg, label_names))
    return honest(cfg, info, label_names, rank, state, server_round, examples=data, **train)


def collude_round(cfg: RunConfig, info, label_names: tuple[str, ...], rank: int,
                  state: State, server_round: int, bad: list[int], **train
                  ) -> tuple[State, int, dict]:
    """`collude`: the attackers' pooled round at rank r_c, sent as -attack.factor x that
    update (`colluding_reply`)."""
    from edge_lam.training.device import local_examples
    from edge_lam.training.device import train_round as honest

    parts = [local_examples(cfg, dataclasses.replace(info, partition_id=p), label_names)
             for p in bad]
    r_c = collusion_rank(cfg, rank)
    sent_c = truncate_lora(state, r_c)
    leader = dataclasses.replace(info, partition_id=bad[0])  # the shared training seed
    trained_c, _, metrics = honest(cfg, leader, label_names, r_c, sent_c, server_round,
                                   examples=pooled(parts), **train)
    own_n = len(parts[bad.index(info.partition_id)])
    return colluding_reply(state, sent_c, trained_c, cfg.attack.factor), own_n, metrics


def defence_round(craft: Callable[..., dict]):
    """An attack built against the robust statistics (`alie`, `min-max`, `min-sum`): the
    colluders pool their partitions, split the pool into attack.samples shards and train
    each (at their common rank r_c, from the same state: estimates of honest updates, the
    same on every colluder), then all send the update `craft` makes of those estimates."""

    def round_(cfg: RunConfig, info, label_names: tuple[str, ...], rank: int, state: State,
               server_round: int, bad: list[int], **train) -> tuple[State, int, dict]:
        from edge_lam.training.device import local_examples
        from edge_lam.training.device import train_round as honest

        parts = [local_examples(cfg, dataclasses.replace(info, partition_id=p), label_names)
                 for p in bad]
        pool = pooled(parts)
        shards = max(2, cfg.attack.samples)
        r_c = collusion_rank(cfg, rank)
        sent_c = truncate_lora(state, r_c)
        leader = dataclasses.replace(info, partition_id=bad[0])  # the shared seeds
        estimates, metrics = [], {}
        for k in range(shards):
            shard = pool.subset(list(range(k, len(pool), shards)))
            trained_k, _, metrics = honest(cfg, leader, label_names, r_c, sent_c,
                                           server_round, examples=shard, **train)
            estimates.append(update_of(sent_c, trained_k))
        crafted = craft(estimates, info.num_partitions, len(bad))
        own_n = len(parts[bad.index(info.partition_id)])
        return _keep_other_keys(attacks._with_updates(state, crafted), state), own_n, metrics

    return round_


# The attacks (`attack.kind`; 'none': honest devices): a `edge_lam.config.registry.Registry`, kind
# "attack" (a third-party one registers through the `edge_lam.attack` entry points).
ATTACKS = registry("attack", key="attack.kind")
for _attack in (
        Attack("sign-flip", lambda sent, trained, factor, sigma, rng:
               attacks.sign_flip(sent, trained)),
        Attack("scale", lambda sent, trained, factor, sigma, rng:
               attacks.scale(sent, trained, factor)),
        Attack("gaussian", lambda sent, trained, factor, sigma, rng:
               attacks.gaussian(sent, trained, sigma, rng or np.random.default_rng())),
        Attack("backdoor", round=backdoor_round, needs_labels=True),
        Attack("collude", round=collude_round),
        Attack("alie", round=defence_round(attacks.alie)),
        Attack("min-max", round=defence_round(lambda est, n, f: attacks.min_max(est))),
        Attack("min-sum", round=defence_round(lambda est, n, f: attacks.min_sum(est)))):
    ATTACKS.register(_attack.name, _attack)
