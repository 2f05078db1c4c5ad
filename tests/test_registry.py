"""The one registry mechanism (`edge_lam.config.registry`), every kind on it, the parse-time cross-key
checks (exact messages) and the one device-profile table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edge_lam.config import registry as registry_module
from edge_lam.config.run_config import RunConfig
from edge_lam.config.options import ConfigError
from edge_lam.config.registry import Registry, registry

ROOT = Path(__file__).resolve().parents[1]


def test_register_get_names_and_the_closest_name():
    reg = Registry("colour", key="paint.colour")

    @reg.register("red")
    def red():
        return "r"

    reg.register("green", "g")
    assert reg.get("red") is red and reg["green"] == "g"
    assert reg.names() == ("red", "green") and "red" in reg and "blue" not in reg
    with pytest.raises(ConfigError) as err:
        reg.get("gren")
    assert str(err.value) == ("paint.colour='gren' is not known: use one of red, green "
                              "(did you mean 'green'?)")
    with pytest.raises(ValueError, match="a colour named 'red' is already registered"):
        reg.register("red", "other")


def test_third_party_entry_points_load_lazily(monkeypatch):
    calls = []

    def fake(groups):
        calls.append(groups)
        return [("violet", "os.path:join")]  # an object: registered under its name

    monkeypatch.setattr(registry_module, "entry_points", fake)
    reg = Registry("shade")
    reg.register("grey", 0)
    assert reg.get("grey") == 0 and calls == []  # a known name loads nothing
    import os.path

    assert reg.get("violet") is os.path.join and calls == [("edge_lam.shade",)]
    reg.names()
    assert len(calls) == 1  # once


def test_every_kind_is_one_registry_declared_where_it_is_defined():
    import server_app.modes
    import server_app.serve.mode
    import strategies.fleet.policy
    import strategies.lora.math
    import strategies.registry
    import strategies.robust.inject
    import strategies.robust.math
    import edge_lam.models.families

    kinds = {"algorithm": strategies.registry.ALGORITHMS,
             "aggregation rule": strategies.lora.math.AGGREGATION_RULES,
             "robust rule": strategies.robust.math.ROBUST_AGGREGATORS,
             "family": edge_lam.models.families.FAMILIES, "mode": server_app.modes.MODES,
             "serve kind": server_app.serve.mode.SERVE_KINDS,
             "selection": strategies.fleet.policy.SELECTION,
             "attack": strategies.robust.inject.ATTACKS}
    for kind, reg in kinds.items():
        assert registry(kind) is reg and isinstance(reg, Registry)
    assert kinds["mode"].names() == ("train", "infer", "serve")
    assert kinds["serve kind"].names() == ("cot", "moe", "split")
    assert kinds["family"].names() == ("seq-cls", "causal-lm", "lm-cls")
    assert kinds["robust rule"].names() == ("mean", "median", "trimmed-mean", "krum",
                                            "multi-krum", "norm-clip", "fltrust")
    assert kinds["selection"].names() == ("all", "random", "oort", "s2", "fedlaavg")
    assert kinds["attack"].names() == ("sign-flip", "scale", "gaussian", "backdoor",
                                       "collude", "alie", "min-max", "min-sum")
    # the mappings other code reads stay dict-like views
    from strategies.lora.math import AGGREGATORS, DELTA_AGGREGATORS, hetlora_aggregate

    assert list(AGGREGATORS) == ["fedavg", "hetlora", "flexlora", "rankwise", "hetlora-sw"]
    assert list(DELTA_AGGREGATORS) == ["flexlora-delta", "flora", "fedex"]
    assert AGGREGATORS.get("hetlora") is hetlora_aggregate and AGGREGATORS.get("fedkd") is None


def test_a_bare_config_imports_no_plug_in():
    code = ("import sys; from edge_lam.config.run_config import RunConfig; c = RunConfig(); c.to_dict; "
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('strategies', 'server_app', 'client_app')]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_shared_library_names_no_plug_in_package():
    paths = sorted((ROOT / "edge_lam").rglob("*.py"))
    assert len(paths) > 30
    for path in paths:
        text = path.read_text()
        for package in ("strategies", "server_app", "client_app"):
            assert f"from {package}" not in text and f"import {package}" not in text \
                and f'import_module("{package}' not in text, (path.name, package)


def test_the_library_never_imports_its_command_line():
    """edge_lam/cli/ imports the library; nothing else in edge_lam/ (nor the apps) imports it."""
    for top in ("edge_lam", "strategies", "server_app", "client_app"):
        for path in (ROOT / top).rglob("*.py"):
            if path.is_relative_to(ROOT / "edge_lam" / "cli"):
                continue
            text = path.read_text()
            assert "edge_lam.cli" not in text and "from edge_lam import cli" not in text, path


def test_the_old_package_name_is_gone():
    """The library was `task/` until issue 26 item 6; `task` now only names the model's job."""
    assert not (ROOT / "task").exists()
    code = "import importlib.util; print(importlib.util.find_spec('task'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "None"


@pytest.mark.parametrize("raw, message", [
    ({"mode": "infer", "task": "seq-cls"},
     "mode='infer' needs task='lm-cls' (labels posed as instructions: data.template, "
     "data.label-words) or task='causal-lm' (generated answers), not 'seq-cls'"),
    ({"mode": "serve", "serve.kind": "cot", "task": "seq-cls"},
     "serve.kind='cot' generates reasoning chains: use task='causal-lm' with a GSM8K-style "
     "data.path, not task='seq-cls'"),
    ({"mode": "serve", "serve.kind": "moe", "task": "causal-lm"},
     "serve.kind='moe' answers labelled queries by label-word likelihood: use task='lm-cls' "
     "(data.template, data.label-words), not 'causal-lm'"),
    ({"mode": "serve", "serve.kind": "moe", "task": "lm-cls", "serve.moe-top-k": 9},
     "serve.moe-top-k=9 exceeds serve.moe-experts=8: route to at most every expert"),
    ({"mode": "serve", "serve.kind": "split", "serve.split-plan": "0:0-12,1-12"},
     "serve.split-plan item '1-12' must read <device>:<start>-<end>, e.g. '0:0-12,1:12-32'"),
    ({"mode": "serve", "serve.kind": "split", "serve.fleet": "rpi4,toaster"},
     "serve.fleet: fleet profile 'toaster' is not known: use one of rpi4, rpi5, "
     "jetson-orin-nano, laptop or a JSON fleet file"),
    ({"mode": "serv"}, "mode='serv' is not known: use one of train, infer, serve (did you "
                       "mean 'serve'?)"),
    ({"serve.kind": "mo"}, "serve.kind='mo' is not known: use one of cot, moe, split (did you "
                           "mean 'moe'?)"),
    ({"robust.aggregator": "krumm"},
     "robust.aggregator='krumm' is not known: use one of none, mean, median, trimmed-mean, "
     "krum, multi-krum, norm-clip, fltrust (did you mean 'krum'?)"),
    ({"attack.kind": "flip"}, "attack.kind='flip' is not known: use one of none, sign-flip, "
                              "scale, gaussian, backdoor, collude, alie, min-max, min-sum (did you mean 'sign-flip'?)"),
    ({"fleet.selection": "oorts"}, "fleet.selection='oorts' is not known: use one of all, "
                                   "random, oort, s2, fedlaavg (did you mean 'oort'?)"),
    ({"task": "lm-clss"}, "task='lm-clss' is not known: use one of seq-cls, causal-lm, lm-cls "
                          "(did you mean 'lm-cls'?)"),
    ({"unlearn.clients": "3"}, "unlearn.clients is set but strategy='hetlora': add "
                               "strategy='unlearn' to forget those devices, or clear "
                               "unlearn.clients"),
])
def test_bad_combinations_fail_at_parse_time(raw, message):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_run_config(raw)
    assert str(err.value) == message


def test_good_mode_combinations_parse():
    RunConfig.from_run_config({"mode": "infer", "task": "lm-cls"})
    RunConfig.from_run_config({"mode": "serve", "serve.kind": "split",
                               "serve.split-plan": "0:0-12,1:12-32"})
    RunConfig.from_run_config({"mode": "serve", "serve.kind": "moe", "task": "lm-cls"})
    RunConfig.from_run_config({"mode": "train", "serve.kind": "moe"})  # not served: no check


def test_one_profile_table_with_the_numbers_of_the_four_it_replaces():
    from server_app.serve.fleet import PROFILES as SERVE
    from server_app.serve.lyapunov import WATTS
    from strategies.fleet.model import PROFILES as FLEET
    from edge_lam.config.sections import DevicesSection

    # the values of the four tables before the merge (edge_lam/config/hardware.py, fleet/model.py
    # _SNR_DB, serve/fleet.py _LINKS, serve/lyapunov.py WATTS) and the default ranks
    speed_mem = {"rpi4": (0.35, 3000.0), "rpi5": (0.8, 6500.0),
                 "jetson-orin-nano": (6.0, 6000.0), "laptop": (4.0, 12000.0)}
    snr = {"rpi4": 10.0, "rpi5": 15.0, "jetson-orin-nano": 20.0, "laptop": 25.0}
    links = {"rpi4": (80, 100, 0.004), "rpi5": (150, 200, 0.003),
             "jetson-orin-nano": (900, 900, 0.001), "laptop": (900, 900, 0.001)}
    watts = {"rpi4": 6.4, "rpi5": 8.5, "jetson-orin-nano": 15.0, "laptop": 45.0}
    for name, (speed, memory) in speed_mem.items():
        assert (FLEET[name].speed, FLEET[name].memory_mib, FLEET[name].snr_db) == \
            (speed, memory, snr[name])
        s = SERVE[name]
        assert (s.speed, s.memory_mib, s.up_mbps, s.down_mbps, s.latency_s) == \
            (speed, memory, *links[name])
    assert WATTS == watts and list(FLEET) == list(SERVE) == list(speed_mem)
    assert DevicesSection().ranks == {"jetson-orin-nano": 8, "laptop": 16, "rpi4": 2,
                                      "rpi5": 4}
