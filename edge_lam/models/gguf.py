"""A GGUF file as a Hugging Face folder (config, tokenizer, fp32 safetensors), written one
tensor at a time.

transformers' own GGUF loading dequantises every tensor into one state dict and builds the
model before it can be saved: converting Gemma-3-270M that way peaked at 3.4 GB of resident
memory, most of a Raspberry Pi 4. Here each tensor is dequantised (a large one a block of rows
at a time), passed through transformers' tensor processor for the architecture (its name map
and fixes: Llama's q/k permutation, Gemma's norm offset) and written straight into the
safetensors file, so the weights in memory at once are one block, and the file holds the same
float32 tensors as `from_pretrained(gguf_file=..., dtype=float32).save_pretrained(...)`. An
architecture whose processor moves tensors around (mixtures of experts) is converted the
transformers way (`streams` says which).
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import numpy as np

# rows of a large tensor dequantised at once: at most this many float32 values (16 MiB)
CHUNK_VALUES = 1 << 22
# transformers' processors that keep every tensor's shape and look at one tensor at a time
_STREAMABLE = ("TensorProcessor", "LlamaTensorProcessor", "Gemma2TensorProcessor")


def _processor(reader, config):
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                           read_field)

    architecture = read_field(reader, "general.architecture")[0]
    return TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config.to_dict())


def streams(reader, config) -> bool:
    """Whether this file's architecture converts tensor by tensor (else: transformers' way)."""
    return type(_processor(reader, config)).__name__ in _STREAMABLE


def _hf_names(reader, config) -> tuple[object, dict[str, str]]:
    """(transformers' tensor processor for this architecture, GGUF name -> HF name)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    processor = _processor(reader, config)
    with torch.device("meta"):  # names and shapes only, no memory
        skeleton = AutoModelForCausalLM.from_config(config)
    return processor, get_gguf_hf_weights_map(skeleton, processor)


def _blocks(tensor, processor, names: dict[str, str]):
    """The float32 rows of one GGUF tensor as transformers would load them, in blocks: a
    tensor the processor leaves as it is a block of rows at a time, one it changes whole."""
    from gguf import dequantize

    data, kind = tensor.data, tensor.tensor_type
    per_row = max(1, int(tensor.n_elements) // max(1, len(data)))
    rows = max(1, CHUNK_VALUES // per_row)
    first = dequantize(data[:rows], kind)
    try:  # processors decide by the tensor's name: one that returns a block as it is
        done = processor.process(weights=first, name=tensor.name, tensor_key_mapping=names,
                                 parsed_parameters={})
    except ValueError:  # it reshapes (a permutation) and a block is not the whole tensor
        done = None
    if done is not None and done.weights is first:  # untouched: the rest block by block
        yield first
        for start in range(rows, len(data), rows):
            yield dequantize(data[start:start + rows], kind)
        return
    if done is None or len(data) > rows:  # changed (e.g. permuted): the whole tensor
        done = processor.process(weights=dequantize(data, kind), name=tensor.name,
                                 tensor_key_mapping=names, parsed_parameters={})
    yield done.weights


def write_safetensors(reader, config, out: Path) -> int:
    """The tensors of a GGUF file (`gguf.GGUFReader`), dequantised to float32 under their HF
    names, as the safetensors file `out`; returns the number of tensors written."""
    processor, names = _hf_names(reader, config)
    # the metadata (Gemma-3's 262k-token vocabulary: ~600 MB of small arrays) is read
    # already; only the tensors are needed from here on
    reader.fields.clear()
    kept = [t for t in reader.tensors if t.name in names]  # transformers skips the others
    header, offset = {}, 0
    for t in kept:  # the processors kept here do not change shapes
        shape = [int(d) for d in reversed(t.shape)]
        size = 4 * int(np.prod(shape))
        header[names[t.name]] = {"dtype": "F32", "shape": shape,
                                 "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with out.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in kept:
            written = 0
            for block in _blocks(t, processor, names):
                written += f.write(np.ascontiguousarray(block, dtype=np.float32).data)
                _drop_pages(reader)
            if written != header[names[t.name]]["data_offsets"][1] - \
                    header[names[t.name]]["data_offsets"][0]:
                raise ValueError(f"GGUF tensor {t.name} came out {written} bytes")
    return len(kept)


def _drop_pages(reader) -> None:
    """Let go of the GGUF pages read so far (the file stays in the page cache): a mapping's
    pages count in the process's resident memory until they are dropped."""
    mapped = getattr(reader.data, "_mmap", None)
    if mapped is not None and hasattr(mapped, "madvise"):
        mapped.madvise(mmap.MADV_DONTNEED)
