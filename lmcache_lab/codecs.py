"""Chunk codecs: how a KV chunk tensor is turned into the tensors a tier stores, and back.

A codec's name is part of the chunk key's namespace (`keys.Namespace.codec`), so a compressed
chunk is never read as a raw one. `none` stores the tensor as it is.
"""
from __future__ import annotations

import torch


class Codec:
    name = "none"
    lossless = True

    def encode(self, chunk: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"kv": chunk}

    def decode(self, stored: dict[str, torch.Tensor]) -> torch.Tensor:
        return stored["kv"]


CODECS: dict[str, type[Codec]] = {"none": Codec}


def get_codec(name: str) -> Codec:
    if name not in CODECS:
        raise ValueError(f"codec: {name!r} is not allowed; choose one of {', '.join(CODECS)}")
    return CODECS[name]()
