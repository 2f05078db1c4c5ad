"""The core sections of the run config: `lora.*`, `devices.*`, `data.*`, `train.*`, `eval.*`,
`dp.*`, `infer.*`, `serve.*`; the simulated federation's `fleet.*`, `robust.*`, `attack.*`
and `faults.*` are in `edge_lam.config.federation_sections`. Each key is declared once, with its
documentation and checks (`edge_lam.config.options`); algorithm plug-ins declare their own sections in
their packages."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from edge_lam.config.federation_sections import (AttackSection, FaultsSection, FleetSection,
                                                 RobustSection, SecureSection)
from edge_lam.config.hardware import HARDWARE
from edge_lam.config.options import ConfigError, Reader, Section, option, parse_section

__all__ = ["CORE_SECTIONS", "AttackSection", "DataSection", "DevicesSection", "DPSection",
           "EvalSection", "FaultsSection", "FleetSection", "InferSection", "LoraSection",
           "RobustSection", "SecureSection", "ServeSection", "TrainSection"]

PARTITIONERS = ("iid", "dirichlet", "pathological")
PROMPT_FORMATS = ("auto", "chat", "plain", "raw")
DTYPES = ("float32", "bfloat16", "float16")
EVAL_METRICS = ("auto", "nll", "exact-match")
SCALINGS = ("alpha-over-r", "rslora")
SERVER_OPTIMIZERS = ("none", "fedavgm", "fedadam")


@dataclass(frozen=True)
class LoraSection(Section):
    """LoRA adapters: where they go and how they scale."""

    target_modules: tuple[str, ...] = option(
        ("auto",), "Linear layers that get LoRA; `auto` = the model family's usual ones "
        "(`query,value` for `seq-cls`; q,k,v,o and the MLP's gate,up,down projections for "
        "the causal-LM families)", kind="names", legacy="target_modules")
    alpha: float = option(16.0, "scaling is alpha / r_max on every device (`lora.scaling-rule`), so "
                          "B@A means the same at every rank", lo=1e-9, legacy="lora_alpha")
    scaling_rule: str = option("alpha-over-r", "the LoRA scaling convention: `alpha-over-r` (LoRA's "
                          "alpha / r) or `rslora` (rank-stabilised, alpha / sqrt(r); Kalajdzievski "
                          "2023): the global adapter uses it at r_max, and with "
                          "`lora.rank-matched-lr` a rank-r_k device learns as standalone LoRA at "
                          "its own rank under the same convention", choices=SCALINGS)
    dropout: float = option(0.05, "LoRA dropout", lo=0.0, hi=0.99, legacy="lora_dropout")
    fedavg_rank: int = option(8, "the single rank of `strategy='fedavg'`", lo=1,
                              legacy="fedavg_rank")
    rank_matched_lr: bool = option(True, "a device of rank r_k < r_max trains its LoRA "
                                   "factors at train.lr x sqrt(r_max / r_k): with scaling "
                                   "alpha / r_max, Adam then moves B@A exactly as standalone "
                                   "LoRA at scaling alpha / r_k (no effect at r_max; "
                                   "`rslora`: (r_max / r_k)^(1/4)); off, every rank "
                                   "shares one scaling: alpha proportional to r")
    rank_warmup_rounds: int = option(0, "heterogeneous ranks: the first N rounds every device "
                                     "trains at the federation's smallest rank, then each at "
                                     "its own (the higher components start once the shared "
                                     "ones have settled)", lo=0)
    server_optimizer: str = option("none", "an optimiser on the aggregate, as Flower's "
                                   "strategies: `fedavgm` (server momentum) or `fedadam` "
                                   "(Reddi et al. 2021), stepping the LoRA factors and head "
                                   "by the round's pseudo-gradient; `none`: the aggregate is "
                                   "the new model", choices=SERVER_OPTIMIZERS)
    server_lr: float = option(1.0, "`lora.server-optimizer`'s learning rate (Flower's "
                              "server_learning_rate / eta; fedadam wants about the devices' "
                              "own step, e.g. 1e-3)", lo=1e-12)
    server_momentum: float = option(0.9, "`fedavgm`: the momentum (Flower's server_momentum)",
                                    lo=0.0, hi=0.999)
    server_beta1: float = option(0.9, "`fedadam`: beta_1", lo=0.0, hi=0.999)
    server_beta2: float = option(0.99, "`fedadam`: beta_2", lo=0.0, hi=0.9999)
    server_tau: float = option(1e-6, "`fedadam`: tau, the adaptivity (added to sqrt(v))",
                               lo=1e-12)
    base_delta_rank: int = option(0, "`fedex` and `flora` (which merge updates into the "
                                  "frozen weights): send each layer's base delta as its best "
                                  "rank-k factors (k (d_out + d_in) numbers instead of d_out "
                                  "d_in), which the device multiplies back; the server keeps "
                                  "the exact delta. 0 = dense", lo=0)

    def check(self, cfg) -> None:
        if self.base_delta_rank and not cfg.merges_into_base:
            raise ConfigError(f"lora.base-delta-rank={self.base_delta_rank} compresses the base "
                              "delta that strategy='fedex' or 'flora' sends; "
                              f"strategy='{cfg.strategy}' sends none: set lora.base-delta-rank=0 "
                              "or pick one of those")


@dataclass(frozen=True)
class DevicesSection(Section):
    """Device profiles: the simulated mix and each profile's LoRA rank."""

    mix: tuple[str, ...] = option(tuple(HARDWARE),
                                  "simulated device k gets profile mix[k % len]",
                                  kind="names", legacy="device_mix")
    # (profile, rank) pairs, sorted; `devices.rank.<profile>` keys (a tuple: hashable)
    profile_ranks: tuple[tuple[str, int], ...] = tuple(sorted(
        (name, hw.rank) for name, hw in HARDWARE.items()))

    @property
    def ranks(self) -> dict[str, int]:
        """Default LoRA rank of each device profile."""
        return dict(self.profile_ranks)

    @classmethod
    def parse(cls, section: str, r: Reader) -> DevicesSection:
        ranks = cls().ranks
        for key in list(r.raw):
            if key.startswith("devices.rank."):
                ranks[key.removeprefix("devices.rank.")] = r.int(key, 0, lo=1)
        return parse_section(cls, section, r, profile_ranks=tuple(sorted(ranks.items())))

    def validate(self) -> None:
        for device in self.mix:
            if device not in self.ranks:
                raise ConfigError(f"devices.mix names '{device}', which has no rank: add "
                                  f"devices.rank.{device}=<rank> or remove it from devices.mix")


@dataclass(frozen=True)
class DataSection(Section):
    """Where each device's data comes from and how it is split in simulation."""

    path: str = option("../shared/data/agnews", "folder with `train.*` and "
                       "`test.*`/`validation.*` (.tsv/.csv/.jsonl), or one file",
                       allow_empty=True, legacy="data_path")
    hub_dataset: str = option("fancyzhx/ag_news", "used when `data.path` does not exist",
                              allow_empty=True, legacy="hub_dataset")
    encoding: str = option("utf-8", "text encoding of the data files (e.g. `latin-1`)")
    text_column: str = option("auto", "text column (`auto`: first of "
                              "text/sentence/content/document)", legacy="text_column")
    label_column: str = option("label", "label column (strings or integers)",
                               legacy="label_column")
    prompt_column: str = option("auto", "`task='causal-lm'`: prompt column (`auto`: first of "
                                "prompt/question/instruction)", legacy="prompt_column")
    response_column: str = option("auto", "`task='causal-lm'`: response column (`auto`: "
                                  "first of response/answer/output/completion)",
                                  legacy="response_column")
    input_column: str = option("auto", "`task='causal-lm'`: a column appended to the prompt "
                               "after a blank line when not empty (Alpaca's `input`; `auto`: "
                               "`input` if the data has it, `none`: never)")
    format: str = option("auto", "`task='causal-lm'`: how prompts are posed: `chat` (the "
                         "tokenizer's chat template), `plain` (`### Instruction:` / `### "
                         "Response:`), `raw` (the prompt and a newline); `auto`: chat when the "
                         "model has a template, else plain", choices=PROMPT_FORMATS)
    template: str = option("{text}\nAnswer:", "`task='lm-cls'`: the prompt, `{text}` replaced "
                           "by the example's text (`\\n`: a line break); the label word "
                           "follows it",
                           legacy="data_template")
    label_words: tuple[str, ...] = option(
        (), "`task='lm-cls'`: one word per label, in the sorted label order (empty = the label "
        "names); each must start with a different token", kind="names", allow_empty=True,
        legacy="data_label_words")
    partitioner: str = option("dirichlet", "`iid`, `dirichlet`, `pathological`: the non-IID "
                              "ones draw over the labels, or `data.group-column`, or (data "
                              "without labels: `task='causal-lm'`) `data.clusters` topical "
                              "clusters of the prompts", choices=PARTITIONERS,
                              legacy="partitioner")
    group_column: str = option("", "a column whose values the non-IID partitioners draw over "
                               "instead of the label or the clusters (a domain, a source, a "
                               "user); empty = none", allow_empty=True)
    clusters: int = option(8, "data without labels, no `data.group-column`: the number of "
                           "topical clusters (k-means over TF-IDF of the prompts' words) the "
                           "non-IID partitioners draw over", lo=2)
    dirichlet_alpha: float = option(0.5, "Dirichlet concentration (smaller = more skewed)",
                                    lo=1e-6, legacy="dirichlet_alpha")
    classes_per_device: int = option(2, "labels per device for `pathological`", lo=1,
                                     legacy="classes_per_device")

    def validate(self) -> None:
        import codecs

        try:
            codecs.lookup(self.encoding)
        except LookupError as err:
            raise ConfigError(f"data.encoding='{self.encoding}' is not a known encoding: use "
                              "e.g. utf-8, latin-1, cp1252") from err

    @classmethod
    def parse(cls, section: str, r: Reader) -> DataSection:
        out = parse_section(cls, section, r)
        # a two-character `\n` typed in a single-quoted run-config value is a line break
        return dataclasses.replace(out, template=out.template.replace("\\n", "\n"))


@dataclass(frozen=True)
class TrainSection(Section):
    """Local training on a device."""

    local_steps: int = option(10, "local optimizer steps per round", lo=1,
                              legacy="local_steps")
    batch_size: int = option(16, "local batch size", lo=1, legacy="batch_size")
    lr: float = option(1e-3, "AdamW learning rate of the LoRA factors", lo=1e-12, legacy="lr")
    head_lr: float = option(0.01, "AdamW learning rate of a classification head (`seq-cls`; "
                            "a fresh head needs a larger step than LoRA); 0 = `train.lr`",
                            lo=0.0)
    max_length: int = option(128, "max tokens per example (`causal-lm`: the prompt is cut in "
                             "its middle first, the response keeps at least half, and a "
                             "warning says how many pairs are cut; 0 = from the data: the "
                             "95th percentile of each device's pair lengths, the longest "
                             "test pair for the server's evaluation)", lo=0,
                             legacy="max_length")

    def validate(self) -> None:
        if 0 < self.max_length < 8:
            raise ConfigError(f"train.max-length={self.max_length} is too short for any "
                              "prompt: give at least 8 tokens, or 0 to take it from the data")
    dtype: str = option("float32", "dtype of the frozen base weights (LoRA stays float32): "
                        "`bfloat16` halves the model's memory where the CPU/GPU supports it",
                        choices=DTYPES)
    loss_chunk: int = option(0, "`task='causal-lm'`: vocabulary projection + cross-entropy in "
                             "chunks of this many response tokens, recomputed in backward "
                             "(0 = all at once)", lo=0)
    gradient_checkpointing: bool = option(False, "recompute the decoder's activations in "
                                          "backward: less memory, about a third more time")
    malloc_mmap_threshold: int = option(
        0, "glibc (Linux) only: allocations of at least this many KiB get a memory mapping "
        "of their own, returned to the OS when freed (mallopt M_MMAP_THRESHOLD, set for the "
        "whole process when the model loads); without it glibc's threshold climbs to 32 MiB "
        "and freed activations pile up in the heap (`edge_lam.training.memory`). 0 = glibc's default",
        lo=0, hi=32768)
    malloc_trim: bool = option(False, "glibc (Linux) only: give the heap's free pages back "
                               "to the OS after each forward pass and each local step "
                               "(malloc_trim): a lower peak for a few more page faults")
    base_dropout: bool = option(False, "keep the frozen base model's own dropout layers "
                                "active in training (BERT-style models have 0.1); off: they "
                                "are skipped, a quarter less memory and time per step "
                                "(LoRA's lora.dropout stays)")


@dataclass(frozen=True)
class EvalSection(Section):
    """The server's evaluation after every round."""

    max_examples: int = option(500, "test examples the server evaluates each round (0 = all)",
                               lo=0, legacy="eval_max_examples")
    batch_size: int = option(64, "evaluation batch size", lo=1, legacy="eval_batch_size")
    seed: int = option(0, "the draw of the `eval.max-examples` test examples: fixed apart "
                       "from the run's `seed`, so runs of different seeds are scored on the "
                       "same examples", lo=0)
    metric: str = option("auto", "`task='causal-lm'`: `nll` (loss, perplexity and token "
                         "accuracy on the responses), `exact-match` (also greedy answers "
                         "compared on the number after `####`, GSM8K's metric); `auto`: "
                         "exact-match when the responses end in `#### <number>`",
                         choices=EVAL_METRICS)
    generate_examples: int = option(100, "`exact-match`: test examples answered by greedy "
                                    "generation each evaluation (0 = all)", lo=0)
    max_new_tokens: int = option(256, "`exact-match`: the longest answer generated", lo=1)


@dataclass(frozen=True)
class DPSection(Section):
    """Differential privacy on devices (Opacus), for every algorithm that trains."""

    enabled: bool = option(False, "differential privacy on devices through Opacus",
                           legacy="dp_enabled")
    target_epsilon: float = option(8.0, "each device's budget for the run, at `dp.delta`; it "
                                   "never spends more", lo=1e-6, legacy="dp_target_epsilon")
    delta: float = option(1e-5, "the delta of (epsilon, delta)-DP", lo=1e-12, hi=0.5,
                          legacy="dp_delta")
    max_grad_norm: float = option(1.0, "per-example clipping norm C", lo=1e-9,
                                  legacy="dp_max_grad_norm")
    noise_multiplier: float = option(0.0, "sigma / C; 0 = derived from `dp.target-epsilon` "
                                     "and `dp.delta` for the run's planned steps", lo=0.0,
                                     legacy="dp_noise_multiplier")
    central: str = option("off", "central (device-level) DP through Flower's DP wrapper "
                          "strategies: `client` (each device clips its update with Flower's "
                          "fixedclipping_mod; works with secure.enabled) or `server` (the "
                          "server clips each reply; strategy='fedavg' only); the server adds "
                          "Gaussian noise z C / m to the uniform mean of the m devices' "
                          "updates; epsilon (RDP, at `dp.delta`) in metrics.jsonl",
                          choices=("off", "client", "server"))
    central_noise: float = option(1.0, "central DP: the noise multiplier z", lo=1e-6)
    central_clip: float = option(0.5, "central DP: the clipping norm C of a device's update "
                                 "(all its tensors as one vector)", lo=1e-9)

    def check(self, cfg) -> None:
        """Central DP: what Flower's wrappers can make private here."""
        if self.central == "off":
            return
        why = ""
        if cfg.strategy not in ("fedavg", "hetlora"):
            why = (f"strategy='{cfg.strategy}' does not release the uniform mean of the "
                   "devices' clipped updates (the sensitivity z C / m assumes it)")
        elif self.central == "server" and cfg.strategy != "fedavg":
            why = ("dp.central='server' clips each reply against the global adapter at r_max: "
                   "every device must train at r_max (strategy='fedavg'), or use "
                   "dp.central='client'")
        elif self.central == "server" and cfg.secure.enabled:
            why = ("the server cannot clip an update it only sees masked (secure.enabled): "
                   "use dp.central='client'")
        elif self.enabled:
            why = "dp.enabled (local DP on devices) and dp.central together: pick one"
        elif cfg.lora.server_optimizer != "none":
            why = (f"lora.server-optimizer='{cfg.lora.server_optimizer}' rescales the mean "
                   "before the noise, so z C / m no longer bounds one device's influence")
        elif cfg.robust.aggregator != "none" or cfg.robust.contribution != "off":
            why = "robust rules and contributions weigh devices unequally"
        if why:
            raise ConfigError(f"dp.central='{self.central}': {why}")


@dataclass(frozen=True)
class InferSection(Section):
    """`mode='infer'`: collaborative inference over the devices (S8 ensembles, S6 trust)."""

    members: tuple[str, ...] = option(
        (), "simulated device k answers with item k % len: `<model>` or `<model>+<saved "
        "adapter folder>` (empty: the run's `model`); in deployment a device's --node-config "
        "`model` / `adapter` win", kind="names", allow_empty=True)
    method: str = option("all", "`all`: every device answers every query and every way of "
                         "combining is scored; `cascade`: every device answers the "
                         "calibration queries, then each query goes to the cheapest device "
                         "and on to the next only while unsure (the compute is really "
                         "saved)", choices=("all", "cascade"))
    batch_size: int = option(16, "queries per QUERY message", lo=1)
    calibration: int = option(50, "the first queries: the server uses their labels for each "
                              "member's quality q_i and the cascade's threshold; accuracies "
                              "are reported on the other queries", lo=1)
    alpha: float = option(0.5, "trust-weighted consensus w_i = alpha q_i + beta t_i", lo=0.0)
    beta: float = option(0.5, "see `infer.alpha`; t_i: agreement with the consensus so far",
                         lo=0.0)
    trust_rate: float = option(0.3, "t_i <- (1 - rate) t_i + rate x (share of the batch "
                               "where member i agreed with the consensus)", lo=0.0, hi=1.0)
    confidence: str = option("max", "the cascade's confidence: `max` probability, `margin` "
                             "(top-1 - top-2) or `entropy`", choices=("max", "margin",
                                                                       "entropy"))
    cascade_loss: float = option(0.01, "the cascade's threshold: the cheapest whose calibration "
                                 "accuracy is within this of the costliest member's", lo=0.0)
    timeout: float = option(300.0, "seconds to wait for a batch's answers; a device later "
                            "than that is left out of that batch's votes", lo=1.0)
    attack: str = option("none", "tests and benchmarks: the devices in `infer.attackers` answer "
                         "`wrong` (always a label other than their own best) or `random`",
                         choices=("none", "wrong", "random"))
    attackers: tuple[int, ...] = option((), "partition ids of the attacking devices",
                                        kind="ids", allow_empty=True)


@dataclass(frozen=True)
class ServeSection(Section):
    """`mode='serve'`: a model's functional modules as micro-services on the devices (S8):
    chain-of-thought steps (`cot`), mixture-of-experts layers (`moe`), layer ranges
    (`split`)."""

    kind: str = option("cot", "what is served: `cot` (each reasoning step generated by a "
                       "device chosen by the placement), `moe` (the server runs attention and "
                       "gating, devices compute their experts, scheduled by Lyapunov "
                       "drift-plus-penalty), `split` (transformer layers partitioned over the "
                       "devices by dynamic programming)", registry="serve kind")
    timeout: float = option(300.0, "seconds to wait for a device's reply to one service call",
                            lo=1.0)
    fleet: tuple[str, ...] = option(tuple(HARDWARE),
                                    "the devices the planners see, simulated device k being "
                                    "item k: profile names (`server_app.serve.fleet`) or one "
                                    "JSON fleet file (name, speed, memory_mib, up_mbps, "
                                    "down_mbps, latency_s per device)", kind="names")
    # --- serve.kind='cot' keys (chain-of-thought steps) ---
    cot_step_tokens: int = option(128, "`cot`: most new tokens one device generates per "
                                  "reasoning step", lo=1)
    cot_max_steps: int = option(4, "`cot`: step budget of a chain (the monolithic baseline "
                                "gets cot-max-steps x cot-step-tokens tokens)", lo=1)
    cot_placement: str = option("exact", "`cot`: how steps are placed on the fleet: `exact` "
                                "(Viterbi DP, or an ILP under step capacities), `heuristic` "
                                "(DP, repair, local search), `greedy` (step by step, the "
                                "cheapest device left), `random`",
                                choices=("exact", "heuristic", "greedy", "random"))
    cot_device_steps: int = option(1, "`cot`: most steps of one chain a device may run "
                                   "(1: every step on a different device)", lo=1)
    cot_batch_size: int = option(16, "`cot`: questions per QUERY (one step of each)", lo=1)
    cot_context: str = option("full", "`cot`: what a step's device sees besides the question: "
                              "`full` (the whole chain so far, re-prefilled) or `last` (only "
                              "the previous step's text: a bounded context of at most "
                              "question + cot-step-tokens tokens, as the seed's micro-services "
                              "do; the server still keeps the whole chain as the answer)",
                              choices=("full", "last"))
    cot_baseline: bool = option(True, "`cot`: also answer every question monolithically on "
                                "the single device with the least predicted latency")
    # --- serve.kind='moe' keys (experts, routing, Lyapunov scheduling) ---
    moe_lyapunov_v: float = option(1e4, "Lyapunov drift-plus-penalty V (S8): weight of energy "
                                   "cost against queue backlog; larger V: cost nearer the "
                                   "optimum C* (gap <= B / V), backlog growing as O(V)", lo=0.0)
    moe_lyapunov_objective: str = option("quadratic", "per-slot drift-plus-penalty objective: "
                                         "`linear` (Q A + V c A, per expert) or `quadratic` "
                                         "(the exact one-slot drift, A^2 couples experts)",
                                         choices=("linear", "quadratic"))
    moe_lyapunov_brute_limit: int = option(4096, "`quadratic`: solve exactly by enumeration "
                                           "when at most this many assignments exist, else "
                                           "greedy + single-expert moves", lo=1)
    moe_experts: int = option(8, "experts E each FFN is split into (its intermediate size "
                              "must divide by E)", lo=1)
    moe_top_k: int = option(4, "experts k each token is routed to (k = E: the dense model)",
                            lo=1)
    moe_calibration: int = option(64, "training texts whose activations cluster the FFN "
                                  "neurons into experts and pick the router's neurons", lo=1)
    moe_router_neurons: int = option(8, "representative neurons per expert whose |activation| "
                                     "sum scores the expert for a token", lo=1)
    moe_scheduler: str = option("round-robin", "expert-to-device assignment per slot: "
                                "`round-robin` (static), `greedy` (cheapest predicted time "
                                "on `serve.fleet`), `lyapunov` (S8 drift-plus-penalty, "
                                "`serve.moe-lyapunov-*`)",
                                choices=("round-robin", "greedy", "lyapunov"))
    # --- serve.kind='split' keys (layer partitioning) ---
    split_plan: str = option("dp", "how the model's units (embedding, decoder layers, head) "
                             "are placed: `dp` (the memory-aware S8 dynamic programme, falling "
                             "back to the best single device when splitting does not pay), "
                             "`single` (the best device that holds the whole model), or fixed "
                             "ranges `<device>:<start>-<end>,...` (e.g. `0:0-12,1:12-32`)")
    split_batch: int = option(8, "prompts per batch sent down the chain of devices", lo=1)
    split_tokens: int = option(128, "tokens per prompt (longer prompts are cut in the middle; "
                               "without task='lm-cls' data: random token ids of this length)",
                               lo=2)
    split_batches: int = option(4, "batches run through the chain (and through the whole "
                                "model locally, to compare logits and time)", lo=1)
    split_repeats: int = option(3, "timing passes per unit when measuring the model's units "
                                "on the server (median)", lo=1)
    split_generate: int = option(0, "also generate this many tokens greedily for each "
                                 "batch (random prompts, task='causal-lm'): every device "
                                 "keeps its layers' KV cache, so a step sends one hidden "
                                 "state per hop; compared token for token with the whole "
                                 "model's generate, and timed against re-running the whole "
                                 "sequence through the chain (no cache) (0: off)", lo=0)
    split_call_s: float = option(0.0, "seconds the messaging itself costs per device call "
                                 "(SuperLink round trip, serialisation), added to every range "
                                 "the planner places: 0 for the in-process grid; about 0.09 "
                                 "measured through a local SuperLink in simulation", lo=0.0)


CORE_SECTIONS: dict[str, type] = {"lora": LoraSection, "devices": DevicesSection,
                                  "data": DataSection, "train": TrainSection,
                                  "eval": EvalSection, "dp": DPSection, "infer": InferSection,
                                  "serve": ServeSection, "fleet": FleetSection,
                                  "robust": RobustSection, "attack": AttackSection,
                                  "faults": FaultsSection,
                                  "secure": SecureSection}


