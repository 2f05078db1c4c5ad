"""Loading a model's weights straight into the training dtype, one tensor at a time.

`from_pretrained` memory-maps a safetensors file: every page it reads stays in the process's
resident memory until the whole model is loaded, so loading the cached fp32 SmolLM2 folder into
bfloat16 peaked at the fp32 file (517 MiB) plus the bf16 model (256 MiB). Here each tensor is
read with plain reads at its offset in the file (a large one 16 MiB of rows at a time) and cast
to the training dtype, so the peak is the model in its dtype plus a few blocks in flight.
(safetensors' own `backend='pread'` reads a whole tensor even for a slice of it.) The
checkpoint still goes through transformers' own loader (`state_dict=`): key renames, tied
weights, missing keys and modules kept in float32 are handled as by a plain
`from_pretrained`. A source this cannot serve (no safetensors files, a quantised checkpoint,
remote code, an unknown dtype) falls back to `from_pretrained`.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

from edge_lam.logs import get_logger

log = get_logger()

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


# a tensor larger than this is read (and cast) a block of rows at a time
BLOCK_BYTES = 16 << 20
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class _FileTensor:
    """One tensor of a safetensors file, read when transformers' loader materialises it
    (`t[...]`) with plain reads at its offset: nothing is memory-mapped, and a large tensor
    is read a block of rows at a time, each block cast into the result when `cast` is given
    (Gemma-3's 640 MiB fp32 embedding never exists whole in fp32). `deepcopy` keeps it
    (from_pretrained copies its keyword arguments)."""

    def __init__(self, path: Path, start: int, dtype: torch.dtype, shape: list[int],
                 cast: torch.dtype | None):
        self.path, self.start, self.dtype, self.shape = path, start, dtype, shape
        self.cast = cast if cast is not None and dtype.is_floating_point else None

    def _read(self, first: int, rows: int) -> torch.Tensor:
        row = math.prod(self.shape[1:]) * self.dtype.itemsize if self.shape else \
            self.dtype.itemsize
        buf = bytearray(rows * row)
        with open(self.path, "rb") as f:
            f.seek(self.start + first * row)
            if f.readinto(buf) != len(buf):
                raise OSError(f"{self.path}: truncated tensor data")
        shape = [rows, *self.shape[1:]] if self.shape else []
        return torch.frombuffer(buf, dtype=self.dtype).reshape(shape) if buf else \
            torch.empty(shape, dtype=self.dtype)

    def __getitem__(self, index):
        total = self.shape[0] if self.shape else 1
        size = math.prod(self.shape) * self.dtype.itemsize
        if self.cast is None or size <= BLOCK_BYTES or not self.shape:
            return self._read(0, total)[index]
        out = torch.empty(self.shape, dtype=self.cast)
        step = max(1, total * BLOCK_BYTES // size)
        for first in range(0, total, step):
            rows = min(step, total - first)
            out[first:first + rows] = self._read(first, rows)  # cast as .to() does
        return out[index]

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


def _lazy_state(files: list[Path], dtype: torch.dtype,
                keep_fp32: tuple[str, ...]) -> dict[str, _FileTensor] | None:
    """Every tensor of `files`, unread (those of modules the model keeps in float32 are not
    cast early); None when a file holds a dtype this reader does not know."""
    state = {}
    for file in files:
        with open(file, "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        for name, info in header.items():
            if info["dtype"] not in _DTYPES:
                return None
            cast = None if any(m in name for m in keep_fp32) else dtype
            state[name] = _FileTensor(file, 8 + size + info["data_offsets"][0],
                                      _DTYPES[info["dtype"]], info["shape"], cast)
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
        keep_fp32 = tuple(getattr(model_class, "_keep_in_fp32_modules", None) or ()) + \
            tuple(getattr(model_class, "_keep_in_fp32_modules_strict", None) or ())
        state = _lazy_state(files, dtype, keep_fp32) if files else None
        if state is not None:
            return _finish(model_class.from_pretrained(None, config=config, state_dict=state,
                                                       dtype=dtype), source)
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
