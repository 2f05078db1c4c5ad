"""A causal LM as a chain of units, any range of which one device runs (layer splitting, S8).

A decoder-only Hugging Face LM (Llama family, Gemma 3) is a chain of n = L + 2 units:
unit 0 the token embedding, units 1..L the decoder layers, unit L + 1 the final norm and
LM head (next-token logits at each row's last real token). `run_units(model, start, end,
x, attention_mask)` runs units [start, end) on `x`: token ids (B, T) when start = 0, else
the hidden states (B, T, H) the previous range returned. Each range builds its decoder
layers' causal masks and rotary position embeddings itself from the attention mask and the
positions 0..T-1 (exactly what the whole model's forward builds), so only hidden states
and the (B, T) mask travel between devices.

`load_units(source, start, end)` builds the model on PyTorch's meta device and reads from
its safetensors files only the weights of units [start, end) (the tied embedding too when
the head needs it), so a device holds its share of the parameters and no more.
`unit_seconds` times each unit on this machine, `unit_param_bytes` weighs them: the
planner's inputs (`server_app.serve.split_plan`).
"""

from __future__ import annotations

import functools
import inspect
import time
from pathlib import Path

import numpy as np
import torch

from edge_lam.config.options import ConfigError


def unit_names(config) -> list[str]:
    """'embed', 'layer.0' ... 'layer.<L-1>', 'head': the n = L + 2 units, in order."""
    return ["embed"] + [f"layer.{i}" for i in range(config.num_hidden_layers)] + ["head"]


def _unit_prefixes(unit: int, num_layers: int) -> tuple[str, ...]:
    if unit == 0:
        return ("model.embed_tokens.",)
    if unit <= num_layers:
        return (f"model.layers.{unit - 1}.",)
    return ("model.norm.", "lm_head.")


def _check_range(start: int, end: int, n: int) -> None:
    if not 0 <= start < end <= n:
        raise ConfigError(f"unit range [{start}, {end}) is not inside the model's {n} units "
                          "(0 = embedding, 1..L = decoder layers, L + 1 = head)")


@functools.lru_cache(maxsize=8)
def load_units(source: str, start: int, end: int) -> torch.nn.Module:
    """The model of `source` (a local folder) with the weights of units [start, end) loaded
    (float32) and every other parameter left on the meta device (no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    files = sorted(Path(source).glob("*.safetensors"))
    if not files:
        raise ConfigError(f"model folder {source} has no .safetensors files: layer splitting "
                          "loads a device's layers from safetensors; save the model with "
                          "save_pretrained (safe_serialization=True)")
    config = AutoConfig.from_pretrained(source)
    config = getattr(config, "text_config", config)
    n = config.num_hidden_layers + 2
    _check_range(start, end, n)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = _read_weights(files, config, start, end)
    model.load_state_dict(state, strict=False, assign=True)
    tied = getattr(config, "tie_word_embeddings", False)
    if tied and start == 0 and end == n:  # one device holds both: one copy, shared
        model.lm_head.weight = model.model.embed_tokens.weight
    _materialise_buffers(model)
    for i in range(start, end):
        module = _unit_module(model, i)
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_meta:
                raise ConfigError(f"unit {i} of {source}: {name} was not found in the "
                                  "checkpoint; this model family is not supported by "
                                  "layer splitting")
    return model.eval()


def _read_weights(files: list[Path], config, start: int, end: int) -> dict:
    from safetensors import safe_open

    layers = config.num_hidden_layers
    wanted = tuple(p for u in range(start, end) for p in _unit_prefixes(u, layers))
    head_tied = end == layers + 2 and getattr(config, "tie_word_embeddings", False)
    state = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if key.startswith(wanted):
                    state[key] = f.get_tensor(key).float()
                elif head_tied and key == "model.embed_tokens.weight" and start > 0:
                    state["lm_head.weight"] = f.get_tensor(key).float()
    if head_tied and "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def _materialise_buffers(model: torch.nn.Module) -> None:
    """Non-persistent buffers (rotary inverse frequencies, Gemma's embedding scale) are not
    in the checkpoint: rebuild them on the CPU from the config."""
    inner = model.model
    inner.rotary_emb = type(inner.rotary_emb)(config=inner.config)
    embed = inner.embed_tokens
    if getattr(embed, "embed_scale", None) is not None and embed.embed_scale.is_meta:
        embed.embed_scale = torch.tensor(float(embed.scalar_embed_scale))


def _unit_module(model, unit: int) -> torch.nn.Module:
    layers = model.config.num_hidden_layers
    if unit == 0:
        return model.model.embed_tokens
    if unit <= layers:
        return model.model.layers[unit - 1]
    return torch.nn.ModuleList([model.model.norm, model.lm_head])


def held_param_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters this process really holds (meta ones excluded, tied counted
    once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if not p.is_meta and p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def unit_param_bytes(model: torch.nn.Module) -> tuple[list[int], int]:
    """(bytes of each unit's parameters, bytes shared by the first and last unit: a tied
    embedding, stored once when one device holds both)."""
    n = model.config.num_hidden_layers + 2
    sizes = [sum(p.numel() * p.element_size() for p in _unit_module(model, u).parameters())
             for u in range(n)]
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    return sizes, (model.lm_head.weight.numel() * model.lm_head.weight.element_size()
                   if tied else 0)


def _layer_context(model, hidden: torch.Tensor, attention_mask: torch.Tensor):
    """(positions (1, T), {layer type: mask}, {layer type: (cos, sin)}) as the whole model's
    forward builds them for positions 0..T-1 and no cache."""
    from transformers.masking_utils import (create_causal_mask,
                                            create_sliding_window_causal_mask)

    inner, config = model.model, model.config
    positions = torch.arange(hidden.shape[1]).unsqueeze(0)  # (1, T)
    args = {"config": config, "inputs_embeds": hidden, "attention_mask": attention_mask,
            "cache": None, "position_ids": positions}
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    masks = {"full_attention": create_causal_mask(**args)}
    if "sliding_attention" in types:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**args)
    if "layer_type" in inspect.signature(inner.rotary_emb.forward).parameters:
        rotary = {t: inner.rotary_emb(hidden, positions, t) for t in types}
    else:
        rotary = dict.fromkeys(types, inner.rotary_emb(hidden, positions))
    return positions, masks, rotary


def _head(model, hidden: torch.Tensor, attention_mask: torch.Tensor,
          vocab_ids: torch.Tensor | None) -> torch.Tensor:
    """(B, V) next-token logits at each row's last real token (or (B, K) at `vocab_ids`)."""
    last = (attention_mask * torch.arange(attention_mask.shape[1])).argmax(dim=1)  # (B,)
    normed = model.model.norm(hidden[torch.arange(len(last)), last])  # (B, H)
    logits = model.lm_head(normed)  # (B, V)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits if vocab_ids is None else logits[:, vocab_ids]


@torch.no_grad()
def run_units(model, start: int, end: int, x: torch.Tensor, attention_mask: torch.Tensor,
              vocab_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Units [start, end) on `x` (ids (B, T) when start = 0, else hidden (B, T, H)); returns
    hidden (B, T, H), or the head's logits (B, V) / (B, K) when the range ends the model."""
    layers = model.config.num_hidden_layers
    _check_range(start, end, layers + 2)
    hidden = model.model.embed_tokens(x) if start == 0 else x  # (B, T, H)
    chosen = range(max(start, 1) - 1, min(end, layers + 1) - 1)
    if len(chosen):
        positions, masks, rotary = _layer_context(model, hidden, attention_mask)
        types = getattr(model.config, "layer_types", None) or ["full_attention"] * layers
        for i in chosen:
            out = model.model.layers[i](hidden, attention_mask=masks[types[i]],
                                        position_embeddings=rotary[types[i]],
                                        position_ids=positions)
            hidden = out[0] if isinstance(out, tuple) else out
    return _head(model, hidden, attention_mask, vocab_ids) if end == layers + 2 else hidden


# ---------------------------------------------------------------- generation, KV-cached
def new_cache(model):
    """An empty KV cache for this model; a device fills only its own layers' entries."""
    from transformers import DynamicCache

    if set(getattr(model.config, "layer_types", None) or ["full_attention"]) != \
            {"full_attention"}:
        raise ConfigError("KV-cached split generation supports full-attention models (Llama "
                          "family, SmolLM2); this model has sliding-window layers")
    return DynamicCache(config=model.config)


def cache_arrays(cache, start: int, end: int, layers: int) -> dict[str, np.ndarray]:
    """The keys and values of the decoder layers among units [start, end), as arrays (what
    a device keeps in its Flower context between messages)."""
    out = {}
    for i in range(max(start, 1) - 1, min(end, layers + 1) - 1):
        layer = cache.layers[i]
        if getattr(layer, "is_initialized", False):
            out[f"k.{i}"] = layer.keys.numpy()
            out[f"v.{i}"] = layer.values.numpy()
    return out


def cache_from_arrays(model, arrays: dict[str, np.ndarray]):
    """A cache holding the saved layers' keys and values (`cache_arrays`)."""
    cache = new_cache(model)
    for key in sorted(k for k in arrays if k.startswith("k.")):
        i = int(key.split(".")[1])
        cache.update(torch.from_numpy(arrays[key]), torch.from_numpy(arrays[f"v.{i}"]), i)
    return cache


@torch.no_grad()
def run_units_cached(model, start: int, end: int, x: torch.Tensor, cache, past: int
                     ) -> torch.Tensor:
    """Units [start, end) on the t new tokens of every row (ids (B, t) when start = 0, else
    hidden (B, t, H)) at positions past..past+t-1, attending to the `past` tokens whose
    keys and values `cache` holds for these layers (then extended with the new ones).
    Rows share one length (no padding). Returns hidden (B, t, H), or the next-token logits
    at the last new token (B, V) when the range ends the model."""
    layers = model.config.num_hidden_layers
    _check_range(start, end, layers + 2)
    hidden = model.model.embed_tokens(x) if start == 0 else x  # (B, t, H)
    t = hidden.shape[1]
    chosen = range(max(start, 1) - 1, min(end, layers + 1) - 1)
    if len(chosen):
        positions = torch.arange(past, past + t).unsqueeze(0)  # (1, t)
        keys = torch.arange(past + t)
        mask = (keys[None, :] <= positions[0][:, None])[None, None]  # (1, 1, t, past + t)
        mask = mask.expand(hidden.shape[0], 1, t, past + t)
        rotary = model.model.rotary_emb(hidden, positions)
        for i in chosen:
            out = model.model.layers[i](hidden, attention_mask=mask,
                                        position_embeddings=rotary, position_ids=positions,
                                        cache=cache, use_cache=True)
            hidden = out[0] if isinstance(out, tuple) else out
    if end < layers + 2:
        return hidden
    logits = model.lm_head(model.model.norm(hidden[:, -1]))  # (B, V)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@torch.no_grad()
def monolithic_logits(model, ids: torch.Tensor, attention_mask: torch.Tensor,
                      vocab_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: the whole model's own forward, logits at each row's last real token."""
    last = (attention_mask * torch.arange(attention_mask.shape[1])).argmax(dim=1)  # (B,)
    keep = torch.unique(last)  # sorted positions: the head runs on these only
    logits = model(input_ids=ids, attention_mask=attention_mask,
                   logits_to_keep=keep).logits  # (B, len(keep), V)
    out = logits[torch.arange(len(last)), torch.searchsorted(keep, last)]
    return out if vocab_ids is None else out[:, vocab_ids]


@torch.no_grad()
def unit_seconds(model, ids: torch.Tensor, attention_mask: torch.Tensor,
                 repeats: int = 3) -> list[float]:
    """Median seconds of each unit on this machine for this batch (one warm-up pass)."""
    n = model.config.num_hidden_layers + 2
    times = np.zeros((repeats, n))
    for r in range(-1, repeats):
        x = ids
        for u in range(n):
            start = time.perf_counter()
            x = run_units(model, u, u + 1, x, attention_mask)
            if r >= 0:
                times[r, u] = time.perf_counter() - start
    return [float(t) for t in np.median(times, axis=0)]


def activation_bytes(config, batch: int, tokens: int, out_width: int) -> int:
    """Float32 activations a device holds while running its range, upper estimate: hidden
    states in and out (B, T, H) x 2, the MLP's gate, up and product (B, T, F) x 3, one
    layer's attention scores (B, heads, T, T), the head's logits (B, out_width)."""
    b, t = batch, tokens
    floats = (2 * b * t * config.hidden_size + 3 * b * t * config.intermediate_size
              + b * config.num_attention_heads * t * t + b * out_width)
    return 4 * floats
