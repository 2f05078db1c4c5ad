"""Rank from capability (S1 "each device trains its own rank, chosen from its capability";
S2's T_comp = local steps x seconds per step): what a device measures, and the rank rule.

Three parts, the pure ones first:
- `Footprint` and `memory_needed_mib` / `step_seconds_at` / `choose_rank`: the memory a
  LoRA rank needs and the seconds its steps take, and the largest candidate rank
  {1, 2, 4, ..., r_max} that fits a device's free memory and the round deadline;
- `free_memory_mib`: what a device has free (CUDA: `torch.cuda.mem_get_info`; else
  `MemAvailable` of /proc/meminfo, psutil where present, capped by a cgroup v2 memory limit
  so a container sees its own), measured once per process, before the model is loaded;
- `measure_step_s` / `report`: seconds per local step, timed once per process with the real
  model (at `MEASURE_RANK`) on real batches of the device's data through
  `edge_lam.training.loop.train_local`, and the profile-reply fields carrying it all
  (`free-memory-mib`, `step-s`, ...).

Simulated or real (the rule the server applies, `simulated` in the reply): a node whose
`--node-config` names no `device` takes its profile from the run's `devices.mix` by partition
id, which only Flower's simulation engine does, so it is *simulated*: the server replaces its
free memory by its fleet profile's `memory_mib` and divides its step time by the profile's
`speed` (the fleet model, `strategies.fleet.model`). A node that names its `device` is *real*:
its own measurement counts. `--node-config "device-measure=0"` marks a named node simulated
(an emulated Pi in a container on a big host), `device-measure=1` a nameless one real.

The server (not the device) applies the rule: the device reports measurements and its model's
footprint; only the server knows the deadline and, in simulation, the fleet model.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from edge_lam.config.options import ConfigError

MIB = 2 ** 20
MEASURE_RANK = 1  # rank the step time is measured at (the smallest candidate)
MEASURE_STEPS = 3  # timed steps, after one untimed warm-up step
# Activation bytes a transformer layer keeps for backward, per token: h (34 + 5 a s / h) for
# 16-bit activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
# Transformer Models", eq. 1: s b h (34 + 5 a s / h) per layer; h hidden size, a heads, s
# tokens), scaled by the base dtype's bytes / 2 (float32: twice). Measured (MiniLM-L6, fp32,
# 2-core CPU, 128 tokens, rank 16; peak RSS growth from loading the model to the end of
# training) and SmolLM2-135M (causal LM, 7 adapted projections, batch 8 x 256 tokens): see
# README's "Rank from capability" for measured against estimated.
ACTIVATION_BYTES_16BIT = 34.0
ATTENTION_SCORE_BYTES_16BIT = 5.0
# PEFT's LoRA dropout keeps, per adapted layer and token, a float32 dropped copy of the
# layer's input and its mask: 5 bytes x d_in, d_in taken as half of (d_in + d_out); counted
# whatever lora.dropout (0 saves it).
LORA_INPUT_BYTES = 5.0
# A causal LM's loss keeps about five float32 copies of the logits (logits, the shifted copy,
# log-softmax, two gradients): 20 bytes per vocabulary entry and token.
LOGIT_BYTES = 20.0
OPTIMIZER_COPIES = 4  # a trained float32 parameter: weight, gradient, Adam's two moments
HEADROOM = 0.8  # a rank must fit in 80 % of the free memory (allocator slack, data pipeline)


@dataclass(frozen=True)
class Footprint:
    """What a model costs to train, independent of the rank (counted on the device)."""

    base_bytes: int  # frozen weights: parameters x their dtype's bytes
    lora_params_per_rank: int  # sum over adapted layers of (d_in + d_out): r x this are LoRA's
    head_params: int  # trainable parameters that are not LoRA factors (a classification head)
    compute_params: int  # weights of the base's Linear layers (what a token multiplies by)
    hidden_size: int
    num_layers: int
    num_heads: int  # attention heads (the attention scores' share of activations)
    logit_units: int  # per-token outputs kept for the loss (a causal LM's vocabulary; 0: seq-cls)
    activation_bytes: int  # bytes per activation element (the base dtype's)


PLANNED_LENGTH = 512  # train.max-length=0: each device takes it from its data; plans assume


def planned_length(cfg) -> int:
    """The tokens per example that memory plans assume: `train.max-length`, or 512 when it is
    0 (taken from each device's data, which the server does not see)."""
    return cfg.train.max_length or PLANNED_LENGTH


def memory_needed_mib(fp: Footprint, rank: int, batch: int, max_length: int) -> float:
    """MiB to train at `rank`: base weights + trained parameters x 4 float32 copies (weight,
    gradient, Adam's two moments) + per token (batch x max_length of them): the layers'
    activations (layers x (34 hidden + 5 heads x max_length) x dtype bytes / 2), LoRA's
    dropped inputs (5 bytes x half the LoRA parameters per rank) and a causal LM's logits
    (20 bytes x logit units)."""
    trained = (rank * fp.lora_params_per_rank + fp.head_params) * OPTIMIZER_COPIES * 4
    tokens = batch * max_length
    per_token_layer = ACTIVATION_BYTES_16BIT * fp.hidden_size + \
        ATTENTION_SCORE_BYTES_16BIT * fp.num_heads * max_length  # h (34 + 5 a s / h)
    activations = tokens * fp.num_layers * per_token_layer * fp.activation_bytes / 2
    lora_inputs = tokens * LORA_INPUT_BYTES * fp.lora_params_per_rank / 2
    logits = tokens * fp.logit_units * LOGIT_BYTES
    return (fp.base_bytes + trained + activations + lora_inputs + logits) / MIB


def step_seconds_at(fp: Footprint, step_s: float, step_rank: int, rank: int) -> float:
    """Seconds per step at `rank`, from `step_s` measured at `step_rank`: per token the frozen
    base costs 4 FLOPs per weight (forward, input gradient), LoRA 6 per factor parameter (and
    its weight gradient). LoRA's rank changes compute little: MiniLM with q,v adapters, r 1
    -> 16 adds about 2 %; the deadline mostly decides whether a device can train at all."""
    def flops(r: int) -> float:
        return 4.0 * fp.compute_params + 6.0 * r * fp.lora_params_per_rank

    return step_s * flops(rank) / flops(step_rank)


def candidate_ranks(r_max: int) -> list[int]:
    """{1, 2, 4, 8, ...} up to r_max, and r_max itself."""
    out, r = [], 1
    while r < r_max:
        out.append(r)
        r *= 2
    return out + [r_max]


def choose_rank(fp: Footprint, free_mib: float, step_s: float, step_rank: int, *,
                local_steps: int, deadline_s: float, batch: int, max_length: int,
                r_max: int) -> int:
    """The largest candidate rank whose memory fits HEADROOM x `free_mib` and whose
    `local_steps` steps fit `deadline_s` (0: no deadline). ConfigError when none does."""
    ranks = candidate_ranks(r_max)
    fits_memory = [r for r in ranks
                   if memory_needed_mib(fp, r, batch, max_length) <= HEADROOM * free_mib]
    if not fits_memory:
        need = memory_needed_mib(fp, ranks[0], batch, max_length)
        raise ConfigError(
            f"rank {ranks[0]} needs {need:.0f} MiB ({HEADROOM:.0%} of the free memory must "
            f"hold it) but only {free_mib:.0f} MiB are free: lower train.batch-size / "
            "train.max-length, use train.dtype=bfloat16, or a smaller model")
    fits = [r for r in fits_memory if deadline_s <= 0 or
            local_steps * step_seconds_at(fp, step_s, step_rank, r) <= deadline_s]
    if not fits:
        need = local_steps * step_seconds_at(fp, step_s, step_rank, fits_memory[0])
        raise ConfigError(
            f"{local_steps} local steps take {need:.2f} s at rank {fits_memory[0]}, over "
            f"fleet.deadline-s={deadline_s:g}: raise fleet.deadline-s or lower "
            "train.local-steps")
    return fits[-1]


# ---------------------------------------------------------------------------- the device
def meminfo_available_mib(meminfo: str) -> float:
    """MemAvailable of a /proc/meminfo text, in MiB."""
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024  # kB
    raise ValueError("no MemAvailable line in /proc/meminfo")


def _cgroup_free_mib() -> float:
    """What a cgroup v2 memory limit leaves (inf without one)."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        used = int((root / "memory.current").read_text())
    except (OSError, ValueError):
        return float("inf")
    return float("inf") if limit == "max" else (int(limit) - used) / MIB


def free_memory_mib() -> float:
    """Free memory where the model will live: the GPU's (CUDA) or the host's RAM."""
    import torch

    from edge_lam.models.lora_model import torch_device

    if torch_device().type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch_device())
        return free / MIB
    try:
        import psutil

        host = psutil.virtual_memory().available / MIB
    except ImportError:
        host = meminfo_available_mib(Path("/proc/meminfo").read_text())
    return min(host, _cgroup_free_mib())


@functools.lru_cache(maxsize=1)
def free_memory_at_start_mib() -> float:
    """`free_memory_mib()` the first time this process asks (before it loads the model)."""
    return free_memory_mib()


def footprint_of(model, cfg) -> Footprint:
    """The Footprint of a PEFT model at any rank (its adapter's shapes give d_in + d_out)."""
    import torch
    from peft.tuners.lora import LoraLayer

    base = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    per_rank = sum(layer.get_base_layer().in_features + layer.get_base_layer().out_features
                   for layer in model.modules() if isinstance(layer, LoraLayer))
    head = sum(p.numel() for n, p in model.named_parameters()
               if p.requires_grad and "lora_" not in n)
    compute = sum(m.weight.numel() for n, m in model.named_modules()  # once per Linear:
                  if isinstance(m, torch.nn.Linear)  # not LoRA's, not a head's trained copy
                  and "lora_" not in n and "modules_to_save" not in n)
    conf = model.config
    return Footprint(
        base_bytes=int(base), lora_params_per_rank=int(per_rank),
        head_params=int(head), compute_params=int(compute),
        hidden_size=int(getattr(conf, "hidden_size", 0)),
        num_layers=int(getattr(conf, "num_hidden_layers", 0)),
        num_heads=int(getattr(conf, "num_attention_heads", 0)),
        logit_units=int(getattr(conf, "vocab_size", 0)) if _family(cfg).lm_head else 0,
        activation_bytes=int(next(p for p in model.parameters()
                                  if not p.requires_grad).element_size()))


def measure_step_s(cfg, info, label_names: tuple[str, ...]) -> tuple[float, Footprint]:
    """(seconds per local step at MEASURE_RANK, the model's Footprint): one warm-up step,
    then MEASURE_STEPS timed ones of `edge_lam.training.loop.train_local` on the device's own data; the
    adapter's state is put back afterwards."""
    from edge_lam.training.device import local_examples
    from edge_lam.models.lora_model import (get_lora_model, get_trainable_state, load_tokenizer,
                                            resolve_model_source, set_trainable_state)
    from edge_lam.training.loop import train_local

    examples = local_examples(cfg, info, label_names)
    model = get_lora_model(cfg, label_names, MEASURE_RANK)
    tokenizer = load_tokenizer(resolve_model_source(cfg.model))
    before = get_trainable_state(model)
    for steps in (1, MEASURE_STEPS):  # warm-up (allocations, kernels), then timed
        out = train_local(model, tokenizer, examples, cfg.updated("train", local_steps=steps),
                          seed=cfg.seed, tag="capability")
    set_trainable_state(model, before)
    return out["train_s"] / MEASURE_STEPS, footprint_of(model, cfg)


_STEPS: dict[tuple, tuple[float, Footprint]] = {}  # (cfg, labels) -> measured, per process


def is_simulated(node_config: Mapping) -> bool:
    """The module's rule: `device-measure` if given (1: real), else no `device` named."""
    if "device-measure" not in node_config:
        return not str(node_config.get("device", ""))
    value = str(node_config["device-measure"]).strip().lower()
    if value not in ("0", "1", "true", "false"):
        raise ConfigError(f"--node-config device-measure={value!r}: use 1 (this device's own "
                          "measurement counts) or 0 (simulated: the fleet model stands in)")
    return value in ("0", "false")


def report(node_config: Mapping, info, ask: Mapping) -> dict:
    """The profile-reply fields of a device asked to measure (`ask`: the QUERY's config, with
    the server's `run-config` (RunConfig.to_dict JSON) and `label-names`): free memory at
    start, seconds per step (once per process), the model's footprint, simulated or not."""
    from edge_lam.config.run_config import RunConfig

    try:
        cfg = RunConfig.from_dict(json.loads(str(ask["run-config"])))
    except (KeyError, ValueError) as err:
        raise ConfigError(f"a capability QUERY without a readable run-config ({err}): the "
                          "server and this device run different edge-lam versions") from err
    labels = tuple(str(x) for x in ask.get("label-names", []))
    free = free_memory_at_start_mib()  # before the model is loaded
    key = (cfg, labels)
    if key not in _STEPS:
        _STEPS[key] = measure_step_s(cfg, info, labels)
    step_s, fp = _STEPS[key]
    return {"free-memory-mib": float(free), "step-s": float(step_s),
            "step-rank": MEASURE_RANK, "simulated": is_simulated(node_config),
            **{f.name.replace("_", "-"): int(getattr(fp, f.name)) for f in fields(Footprint)}}


@dataclass(frozen=True)
class Measured:
    """A device's measurement as the server reads it from the profile reply."""

    free_memory_mib: float
    step_s: float
    step_rank: int
    simulated: bool
    footprint: Footprint

    @classmethod
    def from_reply(cls, p: Mapping) -> Measured:
        try:
            fp = Footprint(**{f.name: int(p[f.name.replace("_", "-")])
                              for f in fields(Footprint)})
            return cls(float(p["free-memory-mib"]), float(p["step-s"]), int(p["step-rank"]),
                       bool(p["simulated"]), fp)
        except KeyError as err:
            raise ConfigError(f"the device's profile reply lacks {err} although "
                              "fleet.rank-from='capability' asked it to measure: run the "
                              "same edge-lam version on the server and the devices") from err

    def as_dict(self) -> dict:
        out = asdict(self)
        out.pop("footprint")
        return out


def _family(cfg):
    from edge_lam.models.families import family  # torch and peft: only once a model is measured

    return family(cfg)
