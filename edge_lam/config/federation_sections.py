"""The run config's sections of the simulated federation: `fleet.*` (who is online, who
trains, the links: S2, S5), `robust.*` (S6), `attack.*` and `faults.*` (Byzantine and
failing devices, R2 / R4). Each key is declared once (`edge_lam.config.options`); each section's
`check(cfg)` asks the registered plug-in its value names (a selection policy, a robust
rule, an attack) what it needs of the rest of the config, when the config is parsed.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_lam.config.options import ConfigError, Section, option


@dataclass(frozen=True)
class FleetSection(Section):
    """The simulated fleet of a training run (S2, S5): links, availability, who trains."""

    selection: str = option("all", "who trains each round: `all` online devices, `random` "
                            "(fleet.per-round of them), `oort` (largest Oort utility), `s2` "
                            "(joint selection + bandwidth allocation, most progress per "
                            "simulated second) or `fedlaavg` (the longest absent; aggregation "
                            "over every device's latest update)",
                            registry="selection")
    per_round: int = option(0, "devices per round for random / oort / fedlaavg (0: every "
                            "online device)", lo=0)
    bandwidth_mhz: float = option(20.0, "total uplink bandwidth B the devices share (MHz); "
                                  "T_up = S / (b log2(1 + SNR))", lo=1e-6)
    downlink_mhz: float = option(40.0, "total downlink bandwidth, split evenly among the "
                                 "round's devices (MHz)", lo=1e-6)
    availability: str = option("always", "who is online: `always`, `markov` (per-profile "
                               "p_on / p_off), `diurnal`, or a JSON trace file {partition id: "
                               "[1, 0, ...]}")
    file: str = option("", "JSON fleet file overriding profile fields {profile: {speed, "
                       "snr_db, p_on, p_off, memory_mib}} (empty: the built-in profiles)",
                       allow_empty=True)
    step_seconds: float = option(10.0, "a device's predicted training seconds (this machine) "
                                 "before any is measured", lo=0.0)
    rank_from: str = option("profile", "how a device's LoRA rank is chosen (S1): `profile` "
                            "(`devices.rank.<profile>`) or `capability` (the device measures "
                            "its free memory and seconds per step at start; the server gives "
                            "it the largest rank in {1, 2, 4, ..., r_max} that fits its memory "
                            "and `fleet.deadline-s`; simulated devices take memory and speed "
                            "from the fleet model); an explicit --node-config lora-rank wins",
                            choices=("profile", "capability"))
    deadline_s: float = option(0.0, "`fleet.rank-from='capability'`: seconds a device's "
                               "train.local-steps may take (its measured step time, / speed "
                               "in simulation); a device that cannot make it is left out "
                               "(0: no deadline)", lo=0.0)

    def check(self, cfg) -> None:
        """What the selection policy needs of the config (`policy.check`), and the run's
        labels for `rank-from='capability'` (the device measures one model with them)."""
        from edge_lam.config.registry import registry

        policy = registry("selection").get(self.selection)
        if hasattr(policy, "check"):
            policy.check(cfg)
        if self.rank_from == "capability" and not cfg.traits.shares_labels(cfg):
            from edge_lam.models.families import family

            if family(cfg).labelled:
                raise ConfigError(f"fleet.rank-from='capability' measures one model with the "
                                  f"run's labels, which strategy='{cfg.strategy}' does not "
                                  "have (its devices train several tasks' heads): use "
                                  "fleet.rank-from='profile'")


CONTRIBUTION_MODES = ("off", "report", "drop-harmful", "softmax")


@dataclass(frozen=True)
class RobustSection(Section):
    """Byzantine-robust aggregation on the LoRA products B A and contribution estimates (S6,
    `strategies.robust`)."""

    aggregator: str = option("none", "`none`: the strategy's own aggregation; else a robust "
                             "statistic of the devices' updates B'A' - BA (per layer, all "
                             "ranks alike), refactorised to r_max: `mean` (the non-robust "
                             "baseline on products), `median`, `trimmed-mean`, `krum`, "
                             "`multi-krum`, `norm-clip`, `fltrust` (cosine trust against an "
                             "update the server trains on its root set)",
                             registry="robust rule", choices=("none",))
    f: int = option(1, "`krum` / `multi-krum`: Byzantine devices assumed (needs K >= 2f + 3 "
                    "replies); multi-Krum keeps K - f", lo=0)
    beta: float = option(0.2, "`trimmed-mean`: fraction dropped at each end per coordinate",
                         lo=0.0, hi=0.49)
    tau: float = option(0.0, "`norm-clip`: update norm bound (0: the median of the round's "
                        "update norms)", lo=0.0)
    root_examples: int = option(32, "`fltrust`: examples of the server's root set, drawn "
                                "(seeded) from the training split", lo=1)
    contribution: str = option("off", "S6 leave-one-out contribution of each device, by "
                               "first-order influence with a diagonal Fisher on the server's "
                               "validation set: `report` (in metrics.jsonl), `drop-harmful` "
                               "(also aggregate without devices whose contribution <= 0), "
                               "`softmax` (weights x exp(c / contribution-temperature))",
                               choices=CONTRIBUTION_MODES)
    fisher: str = option("empirical", "the Hessian of the contribution's second-order term: "
                         "`empirical` (the empirical Fisher mean_i g_i g_i^T, rank <= the "
                         "validation examples; needs the K x D leave-one-out directions in "
                         "memory, else diagonal) or `diagonal` (its diagonal)",
                         choices=("empirical", "diagonal"))
    contribution_examples: int = option(32, "validation examples of the contribution "
                                        "estimate, drawn (seeded) from the training split "
                                        "apart from the root set", lo=1)
    contribution_temperature: float = option(0.01, "`softmax`: temperature T of "
                                             "w_k exp(c_k / T)", lo=1e-12)
    trust_alpha: float = option(1.0, "with a contribution weighting: w = alpha q + (1 - "
                                "alpha) t, q the contribution weights, t the robust "
                                "aggregator's trust weights", lo=0.0, hi=1.0)
    exact_loo: bool = option(False, "also compute the true leave-one-out contribution (K + "
                             "1 validation passes: a check of the estimate, for benchmarks)")

    def check(self, cfg) -> None:
        """S6 works on the LoRA aggregations of factors: not with a strategy that aggregates
        its own way or merges into the frozen weights, nor a selection policy that
        aggregates stored updates."""
        if self.aggregator == "none" and self.contribution == "off":
            return
        from edge_lam.config.registry import registry

        why = ""
        if cfg.traits.aggregates_own_way(cfg):
            why = f"strategy='{cfg.strategy}' aggregates its own way"
        elif cfg.merges_into_base:
            why = f"strategy='{cfg.strategy}' merges updates into the frozen weights"
        elif getattr(registry("selection").get(cfg.fleet.selection), "keeps_latest_updates",
                     False):
            why = (f"fleet.selection='{cfg.fleet.selection}' aggregates every device's "
                   "stored update")
        if why:
            raise ConfigError(f"robust.aggregator='{self.aggregator}' / robust.contribution="
                              f"'{self.contribution}' work on the LoRA aggregations of factors"
                              f" (fedavg, hetlora, flexlora, rankwise, hetlora-sw, flexlora-"
                              f"delta), but {why}: set robust.aggregator='none' robust."
                              "contribution='off' or pick one of those")


@dataclass(frozen=True)
class AttackSection(Section):
    """Byzantine devices for tests and benchmarks (simulation): a seeded fraction of the
    partitions poisons its replies (`strategies.robust.attacks`)."""

    kind: str = option("none", "`none`, `sign-flip` (the update negated), `scale` (x "
                       "attack.factor), `gaussian` (noise of std attack.sigma instead of the "
                       "update), `backdoor` (trains on data where attack.poison of the "
                       "examples carry attack.trigger and the label attack.target), `collude` "
                       "(the attackers pool their data and all send -attack.factor x that "
                       "update); against the defences, the attackers estimate honest updates "
                       "from attack.samples shards of their pooled data and all send: "
                       "`alie` (mean - z std, A Little Is Enough), `min-max` / `min-sum` "
                       "(mean + gamma x the std direction, gamma as large as keeps it within "
                       "the honest updates' largest distance / sum of squared distances)",
                       registry="attack", choices=("none",))
    fraction: float = option(0.2, "fraction of the partitions that attack (drawn with the "
                             "run's seed)", lo=0.0, hi=0.49)
    factor: float = option(10.0, "`scale` / `collude`: the update's multiplier", lo=0.0)
    sigma: float = option(0.01, "`gaussian`: std of the noise per product entry", lo=1e-12)
    trigger: str = option("cf", "`backdoor`: the trigger word put in front of a poisoned "
                          "text")
    target: str = option("", "`backdoor`: the label poisoned examples get (empty: the first "
                         "label)", allow_empty=True)
    poison: float = option(0.5, "`backdoor`: fraction of an attacker's examples poisoned",
                           lo=0.0, hi=1.0)
    samples: int = option(4, "`alie` / `min-max` / `min-sum`: shards of the attackers' pooled "
                          "data they train to estimate the honest updates' spread", lo=2)

    def check(self, cfg) -> None:
        """Some attackers, and a labelled task for an attack that poisons labels
        (`Attack.needs_labels`)."""
        if self.kind == "none":
            return
        from edge_lam.models.families import family
        from edge_lam.config.registry import registry

        if self.fraction <= 0.0:
            raise ConfigError(f"attack.kind='{self.kind}' with attack.fraction=0 draws no "
                              "attacker: set attack.fraction in (0, 0.5) or attack.kind='none'")

        if getattr(registry("attack").get(self.kind), "needs_labels", False) \
                and not family(cfg).labelled:
            raise ConfigError(f"attack.kind='{self.kind}' needs a labelled task (seq-cls / "
                              f"lm-cls), not task='{cfg.task}'")


@dataclass(frozen=True)
class FaultsSection(Section):
    """Device failures injected in simulation (R2): each (device, round) fails with these
    probabilities, drawn from the run's seed, the round and the partition."""

    crash: float = option(0.0, "probability a device crashes in a round (its ClientApp "
                          "raises: the server gets an error reply)", lo=0.0, hi=1.0)
    error: float = option(0.0, "probability a device replies with an error message instead "
                          "of an update", lo=0.0, hi=1.0)
    timeout: float = option(0.0, "probability a device replies too late: it sleeps "
                            "faults.delay-s before replying (set round-timeout below it)",
                            lo=0.0, hi=1.0)
    delay_s: float = option(0.0, "how late a timed-out device replies (0: round-timeout + 5 "
                            "s)", lo=0.0)

    def validate(self) -> None:
        total = self.crash + self.error + self.timeout
        if total > 1.0:
            raise ConfigError(f"faults.crash + faults.error + faults.timeout = {total:g} > 1: "
                              "they are exclusive probabilities per device and round")


@dataclass(frozen=True)
class SecureSection(Section):
    """Secure aggregation of the training uploads (SecAgg+ on Flower's pieces,
    `strategies.secure`)."""

    enabled: bool = option(False, "the server sees only the sum of a round's uploads: each "
                           "device masks its LoRA update (SecAgg+: keys agreed by X25519 "
                           "every round, Shamir shares of the masks, so devices that drop "
                           "after masking cost nothing). For aggregations that are weighted "
                           "sums of the uploads (fedavg, hetlora, rankwise; strategy="
                           "'submodel' with one of them); the others are refused with why")
    threshold: float = option(0.66, "t: shares needed to rebuild a device's masks, a count "
                              "(>= 1) or a fraction (< 1, rounded up) of its neighbourhood "
                              "(itself and its neighbours); more than half of it. Up to "
                              "|neighbourhood| - t devices of each neighbourhood may drop "
                              "after masking and the round still aggregates", lo=0.5001)
    neighbours: int = option(0, "k: each device shares its masks with the k devices next to "
                             "it on the ring of the round's devices (SecAgg+, k ~ 2 log2 n); "
                             "0: with all of them (SecAgg)", lo=0)
    clip: float = option(8.0, "update entries are clipped to +-clip for the fixed point "
                         "(resolution clip x 2^-39, sums exact modulo 2^64); a device logs "
                         "how many it clipped", lo=1e-6)

    def check(self, cfg) -> None:
        """Refused for aggregations that read each device's own upload."""
        if not self.enabled:
            return
        from edge_lam.config.registry import registry

        why = cfg.traits.secure_refusal(cfg)
        if not why and (cfg.robust.aggregator != "none" or cfg.robust.contribution != "off"):
            why = (f"robust.aggregator='{cfg.robust.aggregator}' / robust.contribution="
                   f"'{cfg.robust.contribution}' score each device's own update")
        if not why and getattr(registry("selection").get(cfg.fleet.selection),
                               "keeps_latest_updates", False):
            why = (f"fleet.selection='{cfg.fleet.selection}' keeps every device's latest "
                   "update on the server")
        if why:
            raise ConfigError(f"secure.enabled=true hides each device's upload, but {why}: "
                              "set secure.enabled=false, or use strategy='fedavg', 'hetlora' "
                              "or 'rankwise' (robust.aggregator='none', a fleet.selection "
                              "other than 'fedlaavg')")
        if 1 <= self.threshold != int(self.threshold):
            raise ConfigError(f"secure.threshold={self.threshold}: a count (a whole number "
                              ">= 1) or a fraction below 1")
