"""Wire format of a stored chunk (disk files, Redis values, S3 objects). Never pickle: a shared store
is an attack surface, so every field read back is validated before it sizes an allocation.

    offset  size  field
    0       4     magic  b"LMCK"
    4       2     version (little-endian u16)
    6       4     header length H (u32, <= MAX_HEADER)
    10      8     xxh3_64 checksum of everything after it (catches damage; anyone can compute it)
    18      H     header JSON: {"key", "parent", "position", "tensors": [{"name","dtype","shape"}]}
    18+H    32    tag: HMAC-SHA256 under the store's MAC key of bytes 0..10 + header JSON + payload,
                  or 32 zero bytes for a value written without a store secret
    50+H    ...   payload: the tensors' raw bytes, concatenated in header order

The tag covers the header, hence the chunk key it names, and the payload: a reader holding the MAC
key accepts only values written by a holder of the same key, under the key they are read from.
A reader without a MAC key accepts only untagged values (so every byte of a value is checked either
way), but authenticates nothing: without a secret, whoever can write the store decides what loads.
HMAC-SHA256 rather than keyed BLAKE2b: measured 1.7 GB/s against 0.6 GB/s per 1-8 MiB chunk on an
x86 CPU with SHA extensions (`experiments/bench_core.py --mac`; docs/security.md).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import struct
import warnings
from dataclasses import dataclass
from math import prod

import torch
import xxhash

MAGIC = b"LMCK"
VERSION = 2
MAX_HEADER = 64 * 1024
_PREFIX = struct.Struct("<4sHIQ")    # magic, version, header length, checksum
_SIGNED = struct.Struct("<4sHI")      # the prefix fields the tag covers (all but the checksum)
TAG_SIZE = 32
NO_TAG = bytes(TAG_SIZE)
OVERHEAD = _PREFIX.size + TAG_SIZE    # bytes of a value beside its header and payload
PREFIX_SIZE = _PREFIX.size           # what `head_size` needs to see

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn, "int8": torch.int8, "uint8": torch.uint8,
    "int32": torch.int32, "int64": torch.int64,
}
_NAMES = {v: k for k, v in DTYPES.items()}


class WireError(ValueError):
    """A stored value that is not a valid chunk (corrupted, truncated, foreign, oversized, or not
    authenticated by the reader's MAC key)."""


def mac_key(secret: bytes) -> bytes:
    """The values' MAC key, derived from a deployment's store secret (HMAC-SHA256 with a fixed
    label), so it is independent of the key the chunk-key namespace derives from the same secret."""
    return hmac.digest(secret, b"lmcache_lab wire tag", "sha256")


def _tag(mac: bytes, signed: bytes | memoryview, header: bytes | memoryview,
         payload: list[memoryview]) -> bytes:
    h = hmac.new(mac, signed, hashlib.sha256)
    h.update(header)
    for part in payload:
        h.update(part)
    return h.digest()


@dataclass
class ChunkRecord:
    key: bytes
    parent: bytes | None
    position: int
    tensors: dict[str, torch.Tensor]


@dataclass
class Encoding:
    """A chunk ready to be written: its header and CPU tensors; `nbytes` is the encoded size.
    With a `mac_key` the value carries its tag, else a zero tag."""
    header: bytes
    tensors: list[torch.Tensor]
    nbytes: int
    mac_key: bytes | None = None

    def parts(self) -> list[bytes | memoryview]:
        """The value as consecutive buffers (prefix, header, tag, each tensor's bytes), none of
        the payload copied: write them in order (socket sendall, file writelines) and the reader
        sees one value. The tag and the checksum are computed over the buffers as they are."""
        views = [memoryview(t.reshape(-1).view(torch.uint8).numpy()) for t in self.tensors if t.nbytes]
        signed = _SIGNED.pack(MAGIC, VERSION, len(self.header))
        tag = _tag(self.mac_key, signed, self.header, views) if self.mac_key else NO_TAG
        h = xxhash.xxh3_64(self.header)
        for part in (tag, *views):
            h.update(part)
        return [signed + h.intdigest().to_bytes(8, "little"), self.header, tag, *views]


def prepare(key: bytes, tensors: dict[str, torch.Tensor], parent: bytes | None = None,
            position: int = 0, mac_key: bytes | None = None) -> Encoding:
    """Header and size of a chunk's value, before any payload byte is copied; `mac_key`
    (`mac_key(secret)`) makes the value authenticated."""
    cpu, descr = [], []
    for name, t in tensors.items():
        if t.dtype not in _NAMES:
            raise WireError(f"tensor {name!r}: dtype {t.dtype} cannot be stored")
        t = t.detach().contiguous().cpu()
        cpu.append(t)
        descr.append({"name": name, "dtype": _NAMES[t.dtype], "shape": list(t.shape)})
    header = json.dumps({"key": key.hex(), "parent": parent.hex() if parent else None,
                         "position": int(position), "tensors": descr},
                        separators=(",", ":")).encode()
    return Encoding(header, cpu, OVERHEAD + len(header) + sum(t.nbytes for t in cpu), mac_key)


def encode(key: bytes, tensors: dict[str, torch.Tensor], parent: bytes | None = None,
           position: int = 0, mac_key: bytes | None = None) -> bytearray:
    """The whole value in one new buffer; each tensor's bytes are copied into it exactly once
    (`prepare(...).parts()` hands them over with no copy at all)."""
    return bytearray().join(prepare(key, tensors, parent, position, mac_key).parts())


def decode(data: bytes | bytearray | memoryview, expected_key: bytes | None = None,
           max_payload: int | None = None, alias_readonly: bool = False,
           mac_key: bytes | None = None) -> ChunkRecord:
    """Parse and verify; raises WireError on anything unexpected, and nothing else. `max_payload`
    caps the sizes a header may declare (pass the expected chunk size) so hostile data cannot drive
    allocation: no buffer is allocated before the value is known to be at most that large, and
    none larger than the input is ever allocated. With a `mac_key`, a value whose tag is missing
    or wrong is refused before its header is parsed.

    Tensors of a writable input (bytearray) share its memory; keep it unmodified. A read-only input
    (bytes) is copied once, unless `alias_readonly`: then the tensors share the bytes object too.
    Pass it only for a buffer nothing else references (a fresh network reply), whose tensors are
    only read: chunks are immutable once stored (they are scattered into the engine's cache,
    decoded into new tensors, or kept as they are), and writing through such a tensor would
    change a `bytes` object, which Python promises never changes."""
    view = memoryview(data)
    base = head_size(view[:_PREFIX.size])
    if base > len(view):
        raise WireError("truncated or oversized header")
    payload = view[base:]
    if max_payload is not None and len(payload) > max_payload:
        raise WireError(f"payload of {len(payload)} bytes exceeds the cap of {max_payload}")
    key, parent, position, descr = _verified_header(view[:base], [payload], expected_key, mac_key)
    buffer = view if not view.readonly or alias_readonly else memoryview(bytearray(view))
    tensors, offset = {}, 0
    for name, dtype, shape in descr:
        if any(s < 0 for s in shape):
            raise WireError(f"tensor {name!r}: negative dimension")
        nbytes = prod(shape) * dtype.itemsize
        if offset + nbytes > len(payload):
            raise WireError(f"tensor {name!r}: declares more bytes than the payload holds")
        t = (_frombuffer(buffer, nbytes, base + offset) if nbytes else torch.empty(0, dtype=torch.uint8))
        tensors[name] = t.view(dtype).reshape(shape)
        offset += nbytes
    if offset != len(payload):
        raise WireError("payload longer than the tensors it declares")
    return ChunkRecord(key, parent, position, tensors)


def head_size(prefix: bytes | bytearray | memoryview) -> int:
    """Bytes before the payload (prefix, header, tag) of the value whose first `PREFIX_SIZE`
    bytes are `prefix`; WireError unless magic, version and header length are acceptable."""
    if len(prefix) < _PREFIX.size:
        raise WireError("truncated: shorter than the fixed prefix")
    magic, version, hlen, _ = _PREFIX.unpack_from(prefix)
    if magic != MAGIC:
        raise WireError("not a chunk: bad magic")
    if version != VERSION:
        raise WireError(f"unsupported version {version} (this build reads {VERSION})")
    if hlen > MAX_HEADER:
        raise WireError("truncated or oversized header")
    return OVERHEAD + hlen


def verify_into(head: bytes | bytearray | memoryview, payload: list[memoryview],
                expected_key: bytes, layout: tuple[tuple[str, str, tuple[int, ...]], ...],
                mac_key: bytes | None = None) -> ChunkRecord:
    """Verify a value whose payload was read straight into place: `head` is its first
    `head_size` bytes, `payload` the buffers that took the rest, in order. The checks are
    `decode`'s (checksum, MAC before the header is parsed, key) plus the header declaring exactly
    `layout` ((name, dtype name, shape) per tensor) and nothing more. The record's `tensors` is
    empty: the bytes are where the caller put them. Until this returns, treat them as garbage."""
    view = memoryview(head)
    if len(view) != head_size(view[:_PREFIX.size]):
        raise WireError("head of the wrong length")
    key, parent, position, descr = _verified_header(view, payload, expected_key, mac_key)
    if tuple((name, _NAMES[dtype], tuple(shape)) for name, dtype, shape in descr) != tuple(layout):
        raise WireError(f"declares tensors {descr}, expected {list(layout)}")
    if sum(len(p) for p in payload) != sum(prod(s) * DTYPES[d].itemsize for _, d, s in layout):
        raise WireError("payload size differs from the tensors it declares")
    return ChunkRecord(key, parent, position, {})


def _verified_header(head: memoryview, payload: list[memoryview], expected_key: bytes | None,
                     mac_key: bytes | None):
    """(key, parent, position, [(name, dtype, shape)]) of a value whose prefix, header and tag
    are `head` and payload `payload`, once its checksum and (with `mac_key`) its tag hold."""
    _, _, _, checksum = _PREFIX.unpack_from(head)
    header_bytes, tag = head[_PREFIX.size:len(head) - TAG_SIZE], head[len(head) - TAG_SIZE:]
    h = xxhash.xxh3_64(header_bytes)
    for part in (tag, *payload):
        h.update(part)
    if h.intdigest() != checksum:
        raise WireError("checksum mismatch")
    if mac_key is None:
        if tag != NO_TAG:
            raise WireError("has a MAC: written with a store secret this reader does not have, or altered")
    elif tag == NO_TAG:
        raise WireError("no MAC: written without the store secret")
    elif not hmac.compare_digest(tag, _tag(mac_key, head[:_SIGNED.size], header_bytes, payload)):
        raise WireError("wrong MAC: not written with this store secret, or altered")
    try:
        header = json.loads(bytes(header_bytes))
        key = bytes.fromhex(header["key"])
        parent = bytes.fromhex(header["parent"]) if header["parent"] else None
        position = int(header["position"])
        descr = [(str(d["name"]), DTYPES[d["dtype"]], [int(s) for s in d["shape"]]) for d in header["tensors"]]
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as e:
        raise WireError(f"malformed header: {e!r:.200}") from None
    if expected_key is not None and key != expected_key:
        raise WireError("stored under a different key")
    return key, parent, position, descr


def _frombuffer(buffer: memoryview, count: int, offset: int) -> torch.Tensor:
    if not buffer.readonly:
        return torch.frombuffer(buffer, dtype=torch.uint8, count=count, offset=offset)
    with warnings.catch_warnings():   # torch warns that it cannot mark the tensor read-only;
        warnings.simplefilter("ignore", UserWarning)   # `decode` documents the contract instead
        return torch.frombuffer(buffer, dtype=torch.uint8, count=count, offset=offset)
