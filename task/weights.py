"""Loading a model's weights straight into the training dtype, one tensor at a time.

`from_pretrained` memory-maps a safetensors file: every page it reads stays in the process's
resident memory until the whole model is loaded, so loading the cached fp32 SmolLM2 folder into
bfloat16 peaked at the fp32 file (517 MiB) plus the bf16 model (256 MiB). Here the file is read
with `pread` instead (safetensors' `backend='pread'`): each tensor is read into a buffer of its
own, cast to the training dtype and freed, so the peak is the model in its dtype plus a few
tensors in flight (transformers' loader threads). The checkpoint still goes through
transformers' own loader (`state_dict=`): key renames, tied weights and missing keys are
handled as by a plain `from_pretrained`. A source this cannot serve (no safetensors files, a
quantised checkpoint, remote code, a safetensors without `pread`) falls back to
`from_pretrained`.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch

from task.logs import get_logger

log = get_logger()

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


class _LazyTensor:
    """A safetensors slice that transformers' loader materialises (`t[...]`) when it gets to
    it; `deepcopy` keeps the handle (from_pretrained copies its keyword arguments)."""

    def __init__(self, piece):
        self.piece = piece

    def __getitem__(self, index):
        return self.piece[index]

    def __deepcopy__(self, memo):
        return self


def safetensors_files(source: str) -> list[Path]:
    """The safetensors files of a local folder or of a hub id (downloaded or cached as
    `from_pretrained` would); [] when it has none."""
    folder = Path(source)
    if folder.is_dir():
        index, single = folder / _INDEX, folder / _SINGLE
        index = index if index.is_file() else None
        single = single if single.is_file() else None
    else:
        from transformers.utils import cached_file

        def fetch(name: str) -> Path | None:
            found = cached_file(source, name, _raise_exceptions_for_missing_entries=False,
                                _raise_exceptions_for_connection_errors=False)
            return Path(found) if found else None

        index = fetch(_INDEX)
        single = None if index else fetch(_SINGLE)
    if index is not None:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if folder.is_dir():
            return [folder / s for s in shards]
        from transformers.utils import cached_file

        return [Path(cached_file(source, s)) for s in shards]
    return [single] if single is not None else []


def _lazy_state(files: list[Path], stack: ExitStack) -> dict[str, _LazyTensor] | None:
    """Every tensor of `files`, unread; None when this safetensors cannot `pread`."""
    from safetensors import safe_open

    state = {}
    for file in files:
        try:
            handle = safe_open(str(file), framework="pt", device="cpu", backend="pread")
        except TypeError:  # safetensors before the `backend` argument
            return None
        stack.enter_context(handle)
        state |= {k: _LazyTensor(handle.get_slice(k)) for k in handle.keys()}
    return state


def load_pretrained(auto_class, mapping, source: str, dtype: torch.dtype, **config_kwargs):
    """`auto_class.from_pretrained(source, dtype=dtype, **config_kwargs)`, with the weights read
    tensor by tensor into `dtype` (no memory-mapped copy of the checkpoint stays resident).
    `mapping` is transformers' config class -> model class table for `auto_class`."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, **config_kwargs)
    model_class = mapping.get(type(config), None)
    if isinstance(model_class, type) and getattr(config, "quantization_config", None) is None:
        files = safetensors_files(source)
        with ExitStack() as stack:
            state = _lazy_state(files, stack) if files else None
            if state is not None:
                return _finish(model_class.from_pretrained(None, config=config,
                                                           state_dict=state, dtype=dtype),
                               source)
    return auto_class.from_pretrained(source, dtype=dtype, **config_kwargs)


def _finish(model, source: str):
    """What `from_pretrained(source)` sets beyond the weights: the name and the generation
    configuration saved with the model."""
    from transformers import GenerationConfig

    model.name_or_path = model.config._name_or_path = source
    if model.can_generate():
        try:
            model.generation_config = GenerationConfig.from_pretrained(source)
        except OSError:  # none saved: the one derived from the model's config stays
            pass
    return model
