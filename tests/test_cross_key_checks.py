"""Cross-key checks that once ran when a run started, now when the config is parsed
(`RunConfig.check`: the fleet, robust and attack sections' `check`, the algorithm's Traits,
the mode): the exact messages, and what each plug-in kind says of itself instead of being
named (selection policies, robust rules, attacks, modes)."""

import pytest

from edge_lam.config.run_config import ConfigError, RunConfig
from edge_lam.config.registry import registry

ROBUST_TAIL = (" work on the LoRA aggregations of factors (fedavg, hetlora, flexlora, rankwise,"
               " hetlora-sw, flexlora-delta), but {why}: set robust.aggregator='none' "
               "robust.contribution='off' or pick one of those")


def _refused(raw: dict) -> str:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_run_config(raw)
    return str(err.value)


def test_fedlaavg_needs_an_aggregation_of_padded_factors():
    assert _refused({"strategy": "flexlora", "fleet.selection": "fedlaavg"}) == (
        "fleet.selection='fedlaavg' averages updates of the LoRA factors: use "
        "strategy='fedavg' or 'hetlora', not 'flexlora'")
    for ok in ("fedavg", "hetlora"):
        RunConfig.from_run_config({"strategy": ok, "fleet.selection": "fedlaavg"})


@pytest.mark.parametrize("raw, why", [
    ({"strategy": "flora"}, "strategy='flora' merges updates into the frozen weights"),
    ({"fleet.selection": "fedlaavg"},
     "fleet.selection='fedlaavg' aggregates every device's stored update"),
    ({"strategy": "submodel", "task": "causal-lm"},
     "strategy='submodel' aggregates its own way"),
])
def test_robust_rules_refuse_what_is_not_an_aggregation_of_factors(raw, why):
    got = _refused({"robust.aggregator": "median", **raw})
    assert got == "robust.aggregator='median' / robust.contribution='off'" + \
        ROBUST_TAIL.format(why=why)
    got = _refused({"robust.contribution": "report", **raw})
    assert got == "robust.aggregator='none' / robust.contribution='report'" + \
        ROBUST_TAIL.format(why=why)


def test_a_label_poisoning_attack_needs_a_labelled_task():
    assert _refused({"attack.kind": "backdoor", "task": "causal-lm"}) == (
        "attack.kind='backdoor' needs a labelled task (seq-cls / lm-cls), not "
        "task='causal-lm'")
    RunConfig.from_run_config({"attack.kind": "sign-flip", "task": "causal-lm"})
    assert _refused({"attack.kind": "scale", "attack.fraction": 0.0}) == (
        "attack.kind='scale' with attack.fraction=0 draws no attacker: set attack.fraction "
        "in (0, 0.5) or attack.kind='none'")


def test_resume_is_refused_for_a_mode_that_does_not_resume():
    assert _refused({"mode": "serve", "serve.kind": "split", "resume": "results/7"}) == (
        "resume='results/7' continues a training run, not mode='serve': set resume=''")


def test_the_kinds_say_what_they_need_instead_of_being_named():
    policies = registry("selection")
    assert [n for n, p in policies.items() if p.keeps_latest_updates] == ["fedlaavg"]
    rules = registry("robust rule")
    assert [n for n, r in rules.items() if r.needs_root_update] == ["fltrust"]
    assert rules.get("trimmed-mean").params(RunConfig().robust) == {"beta": 0.2}
    attacks = registry("attack")
    assert [n for n, a in attacks.items() if a.needs_labels] == ["backdoor"]
    assert [n for n, a in attacks.items() if a.round is not None] == [
        "backdoor", "collude", "alie", "min-max", "min-sum"]
    modes = registry("mode")
    assert [n for n, m in modes.items() if m.resumable] == ["train"]
    aggregations = registry("aggregation rule")
    assert [n for n, r in aggregations.items() if r.pads_factors] == ["fedavg", "hetlora"]
    assert [n for n, r in aggregations.items() if r.refactorises] == ["flexlora",
                                                                      "flexlora-delta"]
    assert [n for n, r in aggregations.items() if r.secure] == ["fedavg", "hetlora",
                                                                  "rankwise"]


def test_a_third_party_selection_policy_runs_without_touching_the_scheduler():
    import numpy as np

    from strategies.fleet.model import FleetProfile
    from strategies.fleet.policy import SELECTION, SelectionPolicy, even_split
    from strategies.fleet.scheduler import FleetClock

    class FirstOnly(SelectionPolicy):
        def choose(self, fleet, nodes, online, snr, bits, rng):
            chosen = np.zeros(len(nodes), dtype=bool)
            chosen[np.flatnonzero(online)[:1]] = True
            return even_split(fleet, chosen)

    SELECTION.register("first-only", FirstOnly())
    try:
        cfg = RunConfig.from_run_config({"fleet.selection": "first-only"})
        clock = FleetClock(cfg.fleet.selection, 0, 1e6, 1e6, 0, 1.0)
        for node in (11, 12, 13):
            clock.join(node, node - 11, FleetProfile(speed=1.0, snr_db=20.0))
        assert clock.select(1, [11, 12, 13], {n: 8e3 for n in (11, 12, 13)}) == [11]
        assert not clock.keeps_latest_updates
    finally:
        SELECTION.unregister("first-only")
