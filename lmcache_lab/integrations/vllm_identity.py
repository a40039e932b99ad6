"""What makes vLLM's KV bytes differ, derived from vLLM's own objects (vLLM 0.32).

Chunk keys are chained hashes seeded by a namespace (`lmcache_lab.keys`). The namespace already
holds the model name/revision, the KV dtype, the layout and the tensor-parallel rank; this module
supplies the rest, as pure functions the connector calls:

  model_fingerprint(vllm_config)  everything model-side that changes KV bytes without changing the
                                  model path: dtype, quantization, kv-cache dtype, the (overridden)
                                  HF config with its rope parameters / sliding window / head and
                                  layer counts, revisions, load format, and the weight files.
  pipeline_rank(vllm_config)      the pipeline stage of this worker: two stages hold different
                                  layers, possibly of the same count and shape.
  request_identity(request)       the per-request fields vLLM's own prefix cache folds into its
                                  block hashes (`vllm/v1/core/kv_cache_utils.py`,
                                  `generate_block_hash_extra_keys`), as tagged pairs:
                                  ("lora", lora_identity(...)) then ("cache_salt", salt).
  lora_identity(lora_request)     an adapter's name + path + content fingerprint (not vLLM's
                                  process-local `lora_int_id`).

Refused (`request_identity` returns None; `unsupported_reason` says why): requests whose KV
depends on more than token ids, namely prompt embeddings (`Request.prompt_embeds`), mixed-mode
prompts (`Request.prompt_is_token_ids`) and multimodal inputs (`Request.mm_features`). vLLM keys
those with per-block tensor or encoder hashes that a token-keyed store cannot reproduce.

Tagged pairs: every per-request value travels with the name of its field, so no value of one
field can stand for another (vLLM once keyed a bare LoRA name and a bare cache salt side by side,
so `lora_name == salt` collided: vLLM issue #44701). `encode_identity` gives the injective bytes.

Weight files, the sampling trade-off: gigabytes are never hashed at start-up. A weight file is
fingerprinted by its size, its *.safetensors header (8-byte length + the JSON header: tensor names,
dtypes, shapes, data offsets) and three 64 KiB samples of its data (first, middle, last); other
weight formats (*.bin, *.pt, *.gguf, ...) by size + the same samples of the whole file. That
catches a replaced checkpoint, a changed shape or dtype, a re-quantisation and in-place edits that
touch a sampled range; it misses an in-place edit of the same size that touches only unsampled
bytes (and leaves the header alone). Config and code files (*.json, *.py; tokenizer and
generation files excluded: tokens are hashed already) are hashed whole. The bytes read per weight
file are bounded: 8 + header + 3 x 64 KiB.

A model given as a hub id rather than a local directory has no files to read here: its weights
are identified by name + revision only (pin `revision` to a commit for that to mean anything).
The same holds for a LoRA adapter given as a hub id. A file that cannot be read or parsed raises
`FingerprintError` naming it, at start-up (model) or on first use (adapter).
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import struct
import time
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, Iterable

import torch

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.lora.request import LoRARequest
    from vllm.v1.request import Request

# ================================================================================= constants
SAMPLE_BYTES = 64 * 1024              # each sampled range of a weight file
SAMPLES_PER_FILE = 3                  # first, middle, last
SAFETENSORS_MAX_HEADER = 100 * 2**20  # the format's own limit (safetensors' MAX_HEADER_SIZE)
DIGEST_HEX = 32                       # 128 bits of sha256, like the chunk keys

# Files whose bytes go into the fingerprint: weights (sampled) and configs/code (whole).
WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".tensors",
                             ".npz", ".h5", ".msgpack"})
WHOLE_SUFFIXES = frozenset({".json", ".py"})
# Config files that cannot change KV bytes: the tokenizer (tokens are hashed already) and sampling
# defaults.
NOT_KV_FILES = frozenset({"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                          "added_tokens.json", "vocab.json", "chat_template.json",
                          "generation_config.json"})
# HF config keys that name the checkout rather than describe the model.
HF_VOLATILE_KEYS = frozenset({"_name_or_path", "transformers_version", "_commit_hash"})
LORA_CONFIG_FILE = "adapter_config.json"   # what vllm/lora/peft_helper.py reads
LORA_CACHE_SIZE = 1024
# A file modified less than this long ago is not cached: file times tick coarsely (a jiffy, or a
# second on some filesystems), so a rewrite right after a read can leave size and mtime unchanged.
# Git's "racy clean" rule, for the same reason.
LORA_SETTLE_NS = 2 * 10**9


class FingerprintError(RuntimeError):
    """A file that must be fingerprinted cannot be read or is malformed; the message names it."""


# ================================================================================= canonical form
def _canonical(value: Any, where: str) -> Any:
    """`value` as plain JSON data, deterministic across processes; raises TypeError (naming
    `where`) for a type it does not know rather than falling back to a repr with an address."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, enum.Enum):
        return _canonical(value.value, where)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _canonical(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (set, frozenset)):
        return sorted(_canonical(v, where) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _canonical({f.name: getattr(value, f.name) for f in dataclasses.fields(value)},
                          where)
    if hasattr(value, "model_dump"):                   # pydantic model
        return _canonical(value.model_dump(mode="json"), where)
    if callable(value) and hasattr(value, "__qualname__"):   # e.g. an hf_overrides function:
        return f"{value.__module__}.{value.__qualname__}"      # its effect is in hf_config
    raise TypeError(f"{where}: cannot put a {type(value).__name__} into a fingerprint")


def _digest(obj: Any) -> str:
    data = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(data.encode()).hexdigest()[:DIGEST_HEX]


def _strip_volatile(d: Any) -> Any:
    """An HF config dict without the keys that name a checkout (recursively, for sub-configs)."""
    if isinstance(d, dict):
        return {k: _strip_volatile(v) for k, v in d.items() if k not in HF_VOLATILE_KEYS}
    return d


# ================================================================================= files
def _read_exact(f, offset: int, n: int, path: Path) -> bytes:
    """Exactly `n` bytes at `offset` of an unbuffered file (short reads are retried)."""
    f.seek(offset)
    parts, left = [], n
    while left:
        chunk = f.read(left)
        if not chunk:
            raise FingerprintError(f"{path}: file ended at byte {offset + n - left}, "
                                   f"expected {n} bytes from {offset}")
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def sample_ranges(start: int, end: int) -> list[tuple[int, int]]:
    """The sampled byte ranges of [start, end): the first, middle and last SAMPLE_BYTES; a region
    of at most SAMPLES_PER_FILE * SAMPLE_BYTES is one range, covered whole.
    Invariants: ranges are disjoint, sorted, inside [start, end), and total at most
    SAMPLES_PER_FILE * SAMPLE_BYTES bytes."""
    size = end - start
    if size <= SAMPLES_PER_FILE * SAMPLE_BYTES:
        return [(start, end)] if size > 0 else []
    mid = start + (size - SAMPLE_BYTES) // 2
    return [(start, start + SAMPLE_BYTES), (mid, mid + SAMPLE_BYTES), (end - SAMPLE_BYTES, end)]


def _safetensors_header(f, size: int, path: Path) -> tuple[bytes, int]:
    """The raw JSON header of a safetensors file and where its data section starts; checks the
    header is a JSON object whose tensors' data offsets lie inside the file."""
    if size < 8:
        raise FingerprintError(f"{path}: not a safetensors file ({size} bytes)")
    (n,) = struct.unpack("<Q", _read_exact(f, 0, 8, path))
    if n > SAFETENSORS_MAX_HEADER or 8 + n > size:
        raise FingerprintError(f"{path}: not a safetensors file (header length {n}, "
                               f"file size {size})")
    header = _read_exact(f, 8, n, path)
    try:
        meta = json.loads(header)
    except ValueError as e:
        raise FingerprintError(f"{path}: safetensors header is not JSON ({e})") from e
    if not isinstance(meta, dict):
        raise FingerprintError(f"{path}: safetensors header is not a JSON object")
    data_size = size - 8 - n
    for name, info in meta.items():
        if name == "__metadata__":
            continue
        try:
            lo, hi = info["data_offsets"]
        except (TypeError, KeyError, ValueError) as e:
            raise FingerprintError(f"{path}: tensor {name!r} has no valid data_offsets") from e
        if not 0 <= lo <= hi <= data_size:
            raise FingerprintError(f"{path}: tensor {name!r} data_offsets {lo}..{hi} outside "
                                   f"the {data_size}-byte data section")
    return header, 8 + n


def weight_file_fingerprint(path: str | os.PathLike) -> str:
    """Cheap content fingerprint of one weight file: size, the safetensors header (for
    *.safetensors) and the sampled ranges of the data (`sample_ranges`).

    Invariants: reads at most 8 + header + SAMPLES_PER_FILE * SAMPLE_BYTES bytes; equal files give
    equal fingerprints on any machine (no path, mtime or inode goes in); an unreadable or
    malformed file raises FingerprintError naming it."""
    path = Path(path)
    h = hashlib.sha256()
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            h.update(b"size:%d;" % size)
            data_start = 0
            if path.suffix == ".safetensors":
                header, data_start = _safetensors_header(f, size, path)
                h.update(b"safetensors-header:%d;" % len(header) + header)
            for lo, hi in sample_ranges(data_start, size):
                h.update(b"range:%d:%d;" % (lo, hi) + _read_exact(f, lo, hi - lo, path))
    except OSError as e:
        raise FingerprintError(f"cannot read weight file {path}: {e}") from e
    return h.hexdigest()[:DIGEST_HEX]


def whole_file_fingerprint(path: str | os.PathLike) -> str:
    """sha256 of a small file's bytes (configs, code); raises FingerprintError naming it."""
    path = Path(path)
    try:
        with open(path, "rb", buffering=0) as f:
            data = f.readall()
    except OSError as e:
        raise FingerprintError(f"cannot read {path}: {e}") from e
    return hashlib.sha256(data).hexdigest()[:DIGEST_HEX]


def _file_fingerprint(path: Path) -> str:
    if path.suffix in WEIGHT_SUFFIXES:
        return weight_file_fingerprint(path)
    return whole_file_fingerprint(path)


def fingerprinted_files(directory: str | os.PathLike) -> list[Path]:
    """The files of a model or adapter directory that can change KV bytes, sorted: weight files
    (WEIGHT_SUFFIXES) and config/code files (WHOLE_SUFFIXES, less NOT_KV_FILES), in any
    sub-directory; hidden entries (.cache, .git) are skipped."""
    root = Path(directory)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            p = Path(dirpath, name)
            if name.startswith(".") or name in NOT_KV_FILES:
                continue
            if p.suffix in WEIGHT_SUFFIXES or p.suffix in WHOLE_SUFFIXES:
                out.append(p)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def directory_fingerprint(directory: str | os.PathLike,
                          files: Iterable[Path] | None = None) -> dict[str, str]:
    """{relative path: fingerprint} of the fingerprinted files of `directory`.

    Raises FingerprintError when the directory holds no weight file at all: a model or adapter
    whose weights we cannot see must not be keyed as if it had none."""
    root = Path(directory)
    files = fingerprinted_files(root) if files is None else sorted(files)
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
        raise FingerprintError(f"{root}: no weight file found (looked for "
                               f"{', '.join(sorted(WEIGHT_SUFFIXES))})")
    return {p.relative_to(root).as_posix(): _file_fingerprint(p) for p in files}


# ================================================================================= model
def weights_identity(vllm_config: "VllmConfig") -> dict[str, Any]:
    """The weights the engine loads: a content fingerprint of the local directory (or single
    file, e.g. a .gguf) at `model_config.model`; for a hub id, which has no local files, only the
    name and revision; for `load_format="dummy"` (random weights, no files read) only that."""
    mc, load = vllm_config.model_config, vllm_config.load_config
    if load.load_format == "dummy":
        return {"source": "dummy"}
    path = Path(mc.model)
    if path.is_dir():
        return {"source": "dir", "files": directory_fingerprint(path)}
    if path.is_file():
        return {"source": "file", "files": {path.name: _file_fingerprint(path)}}
    return {"source": "hub", "name": mc.model, "revision": mc.revision}


def model_identity_fields(vllm_config: "VllmConfig") -> dict[str, Any]:
    """The model-side fields that change KV bytes, by their VllmConfig 0.32 names.

    Read as plain attributes on purpose: a field vLLM renames raises AttributeError here (and in
    the tests) instead of silently dropping out of the fingerprint. The model path itself is left
    out (it is in the namespace already): the same files at two paths fingerprint alike."""
    from vllm.transformers_utils.config import iter_rope_parameters

    mc, cc = vllm_config.model_config, vllm_config.cache_config
    hf, text = mc.hf_config, mc.hf_text_config
    fields = {
        "dtype": mc.dtype,                                  # resolved torch.dtype
        "quantization": mc.quantization,                    # method, e.g. "fp8", "awq"
        "quantization_config": mc.quantization_config,      # user-given online quant args
        "revision": mc.revision,
        "code_revision": mc.code_revision,                  # remote modelling code
        "model_weights": mc.model_weights,                  # original URI (object storage)
        "hf_overrides": mc.hf_overrides,                    # dict, or a function's name
        "disable_sliding_window": mc.disable_sliding_window,
        "model_impl": mc.model_impl,                        # vllm / transformers backend
        "sliding_window": mc.get_sliding_window(),
        "arch": mc.model_arch_config,                       # layers, heads, head size, kv heads,
                                                            # hidden size, quant config, MLA...
        "rope": list(iter_rope_parameters(text)),           # rope type / theta / scaling
        "hf_config": _strip_volatile(hf.to_dict()),         # after hf_overrides, rope patching
        "hf_text_config": (None if text is hf else _strip_volatile(text.to_dict())),
        "kv_cache_dtype": cc.cache_dtype,
        "kv_cache_dtype_skip_layers": cc.kv_cache_dtype_skip_layers,
        "load_format": vllm_config.load_config.load_format,
    }
    return _canonical(fields, "model_config")


def model_fingerprint(vllm_config: "VllmConfig") -> str:
    """32 hex chars that change whenever the model-side inputs of the KV bytes change:
    `model_identity_fields` + `weights_identity`. Stable across calls, processes and machines;
    reads a bounded number of bytes per weight file (see the module docstring)."""
    return _digest({"fields": model_identity_fields(vllm_config),
                    "weights": weights_identity(vllm_config)})


# ================================================================================= parallelism
def pipeline_rank(vllm_config: "VllmConfig") -> tuple[int, int]:
    """(rank, size) of this worker's pipeline-parallel stage.

    Size comes from `parallel_config.pipeline_parallel_size`; the rank from vLLM's PP group
    (`vllm.distributed.parallel_state.get_pp_group().rank_in_group`), which must exist when the
    size is above 1 (vLLM's own assertion otherwise). Without pipeline parallelism and before the
    groups exist the answer is (0, 1)."""
    from vllm.distributed.parallel_state import get_pp_group, model_parallel_is_initialized

    size = vllm_config.parallel_config.pipeline_parallel_size
    if size == 1 and not model_parallel_is_initialized():
        return 0, 1
    group = get_pp_group()
    if group.world_size != size:
        raise RuntimeError(f"pipeline group has {group.world_size} ranks but "
                           f"pipeline_parallel_size is {size}")
    return group.rank_in_group, size


# ================================================================================= LoRA
_lora_cache: dict[tuple, str] = {}    # (path, stat signature) -> content digest; insertion order
                                      # = age. Filled idempotently, so a race only recomputes.


def _lora_files(directory: Path) -> list[Path]:
    """adapter_config.json plus every weight file of an adapter directory (the weights vLLM's
    LoRA loader reads, vllm/lora/lora_model.py: adapter_model.safetensors / .bin / .pt, and any
    extra ones such as new_embeddings.*)."""
    config = directory / LORA_CONFIG_FILE
    if not config.is_file():
        raise FingerprintError(f"{directory}: LoRA adapter has no {LORA_CONFIG_FILE}")
    weights = [p for p in fingerprinted_files(directory) if p.suffix in WEIGHT_SUFFIXES]
    return [config, *weights]


def _stat_signature(files: list[Path]) -> tuple:
    """(name, size, mtime_ns, inode, device) of each file: what a rewrite or replacement changes."""
    sig = []
    for p in files:
        try:
            st = p.stat()
        except OSError as e:
            raise FingerprintError(f"cannot stat LoRA file {p}: {e}") from e
        sig.append((p.name, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev))
    return tuple(sig)


def lora_content_fingerprint(directory: str | os.PathLike) -> str:
    """Content fingerprint of a LoRA adapter directory: adapter_config.json's bytes and the cheap
    weight-file fingerprints.

    Cached per (path, each file's name/size/mtime/inode): a rewritten or replaced file changes
    the cache key, so a request costs a directory listing and a few stats, not a read. Files
    modified within LORA_SETTLE_NS are fingerprinted afresh on every call (never cached), so a
    rewrite inside one tick of the file clock cannot leave a stale entry behind."""
    directory = Path(directory).absolute()
    files = _lora_files(directory)
    sig = _stat_signature(files)
    key = (str(directory), sig)
    cached = _lora_cache.get(key)
    if cached is None:
        cached = _digest(directory_fingerprint(directory, files))
        if time.time_ns() - max(mtime for _, _, mtime, _, _ in sig) >= LORA_SETTLE_NS:
            if len(_lora_cache) >= LORA_CACHE_SIZE:
                _lora_cache.pop(next(iter(_lora_cache)))     # oldest entry
            _lora_cache[key] = cached
    return cached


def lora_identity(lora_request: "LoRARequest | None") -> str | None:
    """Stable identity of a LoRA adapter (32 hex chars), None without one.

    Covers `LoRARequest.lora_name`, `.lora_path` (vLLM's own prefix cache keys these two,
    `_gen_lora_extra_hash_keys`), `.is_3d_lora_weight` (how the MoE weights are read) and the
    adapter's content (`lora_content_fingerprint`) when `lora_path` is a local directory; a hub id
    is identified by name and path only. Never `lora_int_id`: it is process-local."""
    if lora_request is None:
        return None
    path = lora_request.lora_path
    local = Path(os.path.expanduser(path))
    if local.is_dir():
        content = lora_content_fingerprint(local)
    elif local.is_absolute() or path.startswith((".", "~")) or local.exists():
        raise FingerprintError(f"LoRA adapter {lora_request.lora_name!r}: {path} is not a "
                               f"directory")
    else:
        content = "hub"
    return _digest({"name": lora_request.lora_name, "path": path,
                    "is_3d_lora_weight": lora_request.is_3d_lora_weight, "content": content})


# ================================================================================= requests
def unsupported_reason(request: "Request") -> str | None:
    """Why a request's KV depends on more than its token ids (the connector refuses it), or
    None. Attribute names from vllm/v1/request.py 0.32."""
    if request.prompt_embeds is not None:
        return "prompt embeddings"
    if request.prompt_is_token_ids is not None:
        return "mixed token/embedding prompt"
    if request.mm_features:
        return "multimodal inputs"
    return None


def request_identity(request: "Request") -> tuple[tuple[str, str], ...] | None:
    """The per-request fields that change KV bytes, as (field, value) pairs in a fixed order
    (vLLM's own order: lora, then cache_salt); () for a plain request; None for a request the
    connector must refuse (`unsupported_reason`).

    Mirrors the non-multimodal extra keys of vLLM's block hashes
    (`generate_block_hash_extra_keys`): the LoRA adapter and the cache salt. Like vLLM, an empty
    salt counts as no salt. Prompt-embeds keys are not mirrored: such requests are refused.
    Raises FingerprintError when the request's LoRA adapter cannot be read."""
    if unsupported_reason(request) is not None:
        return None
    pairs: list[tuple[str, str]] = []
    lora = lora_identity(request.lora_request)
    if lora is not None:
        pairs.append(("lora", lora))
    if request.cache_salt:
        pairs.append(("cache_salt", request.cache_salt))
    return tuple(pairs)


def encode_identity(pairs: tuple[tuple[str, str], ...]) -> bytes:
    """Injective bytes of `request_identity`'s pairs (JSON: no separator a value can forge)."""
    return json.dumps([list(p) for p in pairs], separators=(",", ":"),
                      ensure_ascii=True).encode()
