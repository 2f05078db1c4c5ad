"""The run config: a composition of sections, each declaring its keys where they live.

Flower hands every component the flattened `[tool.flwr.app.config]` table of pyproject.toml,
merged with `flwr run --run-config "..."` overrides (`lora.alpha`, `train.lr`, ...).
`RunConfig.from_run_config` parses it into the top-level keys and one frozen dataclass per
section (`cfg.lora`, `cfg.devices`, `cfg.data`, `cfg.train`, `cfg.eval`, `cfg.dp`, and the
sections that algorithm plug-ins register, e.g. `cfg.unlearn`, `cfg.fedkd`), and fails
before anything runs, naming the key and the fix. Each key is declared once, with its
documentation, by `edge_lam.config.options.option`; `edge-lam config --markdown` prints README's table.

Names of plug-in kinds (`strategy`, `task`, `mode`, `serve.kind`, `robust.aggregator`,
`attack.kind`, `fleet.selection`) are looked up in their registries (`edge_lam.config.registry`); the
kinds declared outside this library come from entry points when a config is first parsed,
never by import here. Algorithm plug-ins register their name, their section and their
`Traits`: what the config derives from them (the LoRA rank of a device, r_max, how many
rounds a run has). Cross-key checks run once per parse (`RunConfig.check`): each section's
`check(cfg)`, the chosen algorithm's `Traits.check` and the chosen mode's `check`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edge_lam.config.options import (ConfigError, Reader, declared, key_of, option, parse_section,
                                     read_option)
from edge_lam.config.registry import Registry, registry
from edge_lam.config.sections import (CORE_SECTIONS, DataSection, DevicesSection, DPSection,
                                      EvalSection, FaultsSection, FleetSection, InferSection,
                                      LoraSection, AttackSection, RobustSection, SecureSection, ServeSection,
                                      TrainSection)

__all__ = ["ConfigError", "RunConfig", "Traits", "algorithms", "sections", "strategy_names"]



# ---------------------------------------------------------------------------- plug-ins
class Traits:
    """What the run config derives from an algorithm; plug-ins override what differs.

    The defaults are HetLoRA's (S1): every device at its profile's rank, r_max the largest.
    """

    def aggregation(self, cfg: RunConfig) -> str:
        """How training rounds aggregate (a LoRA aggregation's name)."""
        return cfg.strategy

    def training_rounds(self, cfg: RunConfig) -> int:
        return cfg.num_rounds

    def total_rounds(self, cfg: RunConfig) -> int:
        return self.training_rounds(cfg)

    def planned_private_steps(self, cfg: RunConfig) -> int:
        """Noisy releases a device plans for (what a DP budget is spread over)."""
        return cfg.num_rounds * cfg.train.local_steps

    def r_max(self, cfg: RunConfig) -> int:
        return max(cfg.devices.ranks.values())

    def rank_for(self, cfg: RunConfig, device: str, explicit_rank: int = 0) -> int:
        if explicit_rank > 0:
            if explicit_rank > cfg.r_max:
                raise ConfigError(
                    f"a device asked for lora-rank={explicit_rank}, above the largest profile "
                    f"rank r_max={cfg.r_max}: raise devices.rank.<profile> or lower its "
                    "lora-rank")
            return explicit_rank
        if device not in cfg.devices.ranks:
            raise ConfigError(
                f"unknown device profile '{device}': add devices.rank.{device}=<rank> to the "
                f"run config, or use one of {', '.join(sorted(cfg.devices.ranks))}")
        return cfg.devices.ranks[device]

    def merges_into_base(self, cfg: RunConfig) -> bool:
        """Does the global state carry per-layer frozen base deltas (`edge_lam.training.lora.BASE_DELTA`)?"""
        return False

    def aggregates_own_way(self, cfg: RunConfig) -> bool:
        """Does its strategy replace the LoRA aggregation of `cfg.aggregation` by its own
        (S6's robust rules and FedLaAvg's stored updates then do not apply)?"""
        return False

    def secure_refusal(self, cfg: RunConfig) -> str:
        """Why `secure.enabled` cannot hide this algorithm's uploads ("" when it can: its
        aggregation rule is a weighted sum of them, `AggregationRule.secure`)."""
        from edge_lam.config.registry import registry

        name = self.aggregation(cfg)
        rule = registry("aggregation rule").get(name)
        if getattr(rule, "secure", ""):
            return ""
        return (f"the aggregation '{name}' is not a sum of the devices' uploads: "
                f"{getattr(rule, 'not_secure', '') or 'it reads each one'}")

    def shares_labels(self, cfg: RunConfig) -> bool:
        """Do all devices train one model with the run's labels (FedKD: one head per task)?"""
        return True

    def check(self, cfg: RunConfig) -> None:
        """Raise ConfigError when the config does not suit this algorithm."""


def algorithms() -> Registry:
    """The algorithm registry (declared in `strategies.registry`; its members come from the
    `edge_lam.algorithm` entry points, loaded when a name is first looked up)."""
    return registry("algorithm", key="strategy", groups=("edge_lam.plugins",))


def strategy_names() -> tuple[str, ...]:
    return algorithms().names()


def sections() -> dict[str, type]:
    """Every section, core first, then the registered algorithms' in registration order."""
    plugins = dict(a.section for a in algorithms().values() if a.section is not None)
    return {**CORE_SECTIONS, **plugins}


# ---------------------------------------------------------------------------- the config
@dataclass(frozen=True)
class RunConfig:
    """Every knob of a run. Top-level keys are fields; each section is one dataclass."""

    strategy: str = option("hetlora", "the federated algorithm, a registered plug-in",
                           registry="algorithm")
    num_rounds: int = option(3, "federated rounds (with `unlearn`: the training rounds "
                             "before the request)", key="num-server-rounds", lo=1,
                             legacy="num_rounds")
    fraction_train: float = option(1.0, "fraction of connected devices that train each round",
                                   lo=0.0, hi=1.0, legacy="fraction_train")
    min_devices: int = option(2, "minimum devices per round (and connected before starting)",
                              lo=1, legacy="min_devices")
    round_timeout: float = option(3600.0, "seconds to wait for replies in a round", lo=1.0,
                                  legacy="round_timeout")
    model: str = option("sentence-transformers/all-MiniLM-L6-v2", "hub id or local folder",
                        legacy="model")
    task: str = option("seq-cls", "model family: `seq-cls`, `causal-lm` (instruction tuning on "
                       "prompt/response) or `lm-cls` (classification posed to a causal LM "
                       "through `data.template`, answered by label-word likelihood)",
                       registry="family", legacy="task")
    seed: int = option(42, "seeds partitions, initialisation and local shuffling",
                       legacy="seed")
    results_dir: str = option("results", "where `<run-id>/` is written", legacy="results_dir")
    mode: str = option("train", "what the app does: `train` (federated fine-tuning), "
                       "`infer` (collaborative inference: every device answers the test "
                       "queries, the server combines them; the `infer.` keys) or `serve` "
                       "(a model's modules as micro-services on the devices; the `serve.` "
                       "keys)", registry="mode")
    resume: str = option("", "continue an interrupted training run from its last finished "
                         "round: its folder `results/<run-id>` (or the run id under "
                         "`results-dir`), whose `checkpoint/` every finished round rewrites. "
                         "A new run id is issued; the folder keeps growing where it stopped. "
                         "Same config required (`num-server-rounds` may grow, `results-dir` "
                         "and `round-timeout` may differ); refused for `fedkd`, `dp.enabled` "
                         "and an unlearning run past its training rounds",
                         allow_empty=True)
    lora: LoraSection = LoraSection()
    devices: DevicesSection = DevicesSection()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    dp: DPSection = DPSection()
    infer: InferSection = InferSection()
    serve: ServeSection = ServeSection()
    fleet: FleetSection = FleetSection()
    robust: RobustSection = RobustSection()
    attack: AttackSection = AttackSection()
    faults: FaultsSection = FaultsSection()
    secure: SecureSection = SecureSection()
    # (name, section) of the plug-ins' sections that differ from their defaults; a section
    # not here reads as its defaults (so a bare RunConfig() loads no plug-in)
    plugins: tuple[tuple[str, Any], ...] = ()

    def __getattr__(self, name: str) -> Any:  # cfg.unlearn, cfg.fedkd: plug-in sections
        if name.startswith("_"):
            raise AttributeError(name)
        for sec_name, value in self.__dict__.get("plugins", ()):
            if sec_name == name:
                return value
        cls = sections().get(name)
        if cls is not None and name not in CORE_SECTIONS:
            return cls()
        raise AttributeError(f"RunConfig has no attribute or section '{name}'")

    # ------------------------------------------------------------------ derived values
    @property
    def traits(self) -> Traits:
        return algorithms().get(self.strategy).traits

    def reads_section(self, name: str) -> bool:
        """Does the chosen algorithm declare the plug-in section `name` (`cfg.unlearn`)?"""
        section = algorithms().get(self.strategy).section
        return section is not None and section[0] == name

    @property
    def aggregation(self) -> str:
        return self.traits.aggregation(self)

    @property
    def training_rounds(self) -> int:
        return self.traits.training_rounds(self)

    @property
    def total_rounds(self) -> int:
        return self.traits.total_rounds(self)

    @property
    def planned_private_steps(self) -> int:
        return self.traits.planned_private_steps(self)

    @property
    def r_max(self) -> int:
        """Rank of the global adapter the server keeps (S1: r_max = max_k r_k)."""
        return self.traits.r_max(self)

    @property
    def merges_into_base(self) -> bool:
        return self.traits.merges_into_base(self)

    @property
    def lora_scaling(self) -> float:
        """The factor in front of B@A on every device, whatever its rank: alpha / r_max
        (`lora.scaling='rslora'`: alpha / sqrt(r_max))."""
        return self.scaling_at(self.r_max)

    def scaling_at(self, r_max: int) -> float:
        """The shared LoRA scaling of a global adapter of rank `r_max` (`lora.scaling`)."""
        return self.lora.alpha / (math.sqrt(r_max) if self.lora.scaling_rule == "rslora" else r_max)

    def rank_for(self, device: str, explicit_rank: int = 0) -> int:
        """LoRA rank a device trains at (S1's r_k)."""
        return self.traits.rank_for(self, device, explicit_rank)

    def device_for(self, partition_id: int, reported: str = "") -> str:
        """Device profile of a node: what it reports, else the simulated mix by partition id."""
        if reported:
            return reported
        if partition_id < 0:
            raise ConfigError(
                "a device reported neither a profile nor a partition id: start it with "
                "--node-config \"device='rpi4' ...\" (profiles: "
                f"{', '.join(sorted(self.devices.ranks))})")
        return self.devices.mix[partition_id % len(self.devices.mix)]

    def updated(self, section: str = "", **changes: Any) -> RunConfig:
        """A copy with `changes` to a section's fields (top-level ones with section='')."""
        if not section:
            return dataclasses.replace(self, **changes)
        if section in CORE_SECTIONS:
            return dataclasses.replace(
                self, **{section: dataclasses.replace(getattr(self, section), **changes)})
        current = dict(self.plugins)
        current[section] = dataclasses.replace(getattr(self, section), **changes)
        return dataclasses.replace(self, plugins=_non_default(current))

    # ------------------------------------------------------------------ (de)serialising
    def to_dict(self) -> dict[str, Any]:
        """The flat form results files have always used (config.json, edge_lam.json): one
        name per field (`local_steps`, `unlearn_lr`, ...), plus derived values."""
        out: dict[str, Any] = {}
        for f in declared(RunConfig):
            out[f.metadata.get("legacy") or f.name] = _plain(getattr(self, f.name))
        for name in sections():
            sec = getattr(self, name)
            for f in declared(type(sec)):
                out[f.metadata.get("legacy") or f"{name}_{f.name}"] = _plain(getattr(sec, f.name))
            if hasattr(sec, "legacy_extra"):
                out.update(sec.legacy_extra(name))
        out["profile_ranks"] = self.devices.ranks
        out["r_max"] = self.r_max
        out["lora_scaling"] = self.lora_scaling
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any]) -> RunConfig:
        """Invert `to_dict` (a saved adapter's edge_lam.json); also reads the flat form older
        releases saved. Unknown or derived keys are ignored, missing ones take defaults."""
        raw = _from_legacy(saved)
        known = {key_of("", f) for f in declared(RunConfig)} | {
            key_of(n, f) for n, c in sections().items() for f in declared(c)}
        keep = {k: (",".join(map(str, v)) if isinstance(v, list) else v)
                for k, v in raw.items()
                if k in known or k.startswith(("devices.rank.", "fedkd.task."))}
        return cls.from_run_config(keep)

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_run_config(cls, raw: Mapping[str, Any]) -> RunConfig:
        """Parse Flower's flattened run config (unknown keys are an error: typos bite)."""
        r = Reader(_renamed(raw))
        top = {f.name: read_option(r, key_of("", f), f) for f in declared(cls)}
        parsed = {}
        for name, sec_cls in sections().items():
            parse = getattr(sec_cls, "parse", None)
            parsed[name] = parse(name, r) if parse else parse_section(sec_cls, name, r)
        r.reject_unknown(prefixes=("devices.rank.",))
        core = {n: parsed.pop(n) for n in CORE_SECTIONS}
        cfg = cls(**top, **core, plugins=_non_default(parsed))
        cfg.check()
        return cfg

    def check(self) -> None:
        """The cross-key checks, once per parse: every section's `check(cfg)` (what its keys
        need of the rest), the chosen algorithm's and the chosen mode's (ConfigError)."""
        for name in sections():
            getattr(self, name).check(self)
        self.traits.check(self)
        mode = registry("mode").get(self.mode)
        mode.check(self)
        if self.resume and not getattr(mode, "resumable", False):
            raise ConfigError(f"resume='{self.resume}' continues a training run, not mode="
                              f"'{self.mode}': set resume=''")


def _non_default(sections_: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple((n, s) for n, s in sections_.items() if s != type(s)())


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# Keys renamed since they were introduced: old name -> new name (a warning says so).
RENAMED: dict[str, str] = {}


def _renamed(raw: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(raw)
    for old, new in RENAMED.items():
        if old in out:
            warnings.warn(f"run-config key {old} is deprecated: use {new}", FutureWarning)
            out.setdefault(new, out.pop(old))
    return out


def _from_legacy(saved: Mapping[str, Any]) -> dict[str, Any]:
    """The flat field names of the pre-sections RunConfig, as run-config keys."""
    names = {f.metadata.get("legacy") or f.name: key_of("", f) for f in declared(RunConfig)}
    for sec_name, cls in sections().items():
        for f in declared(cls):
            names[f.metadata.get("legacy") or f"{sec_name}_{f.name}"] = key_of(sec_name, f)
    raw = {names[k]: v for k, v in saved.items() if k in names}
    raw.update({f"devices.rank.{p}": r for p, r in dict(saved.get("profile_ranks", {})).items()})
    for sec_name, cls in sections().items():
        if hasattr(cls, "from_legacy_extra"):
            raw.update(cls.from_legacy_extra(sec_name, saved))
    return raw
