import subprocess
import sys

import numpy as np
import pytest
import torch

from lmcache_lab.keys import ChunkKeyer, Namespace

NS = Namespace(model="m", kv_dtype="bfloat16", layout="vllm_cpu")


def test_only_full_chunks_get_keys():
    k = ChunkKeyer(NS, chunk_size=4)
    assert len(k.keys(list(range(3)))) == 0
    assert len(k.keys(list(range(11)))) == 2
    assert len(k.keys(list(range(12)), max_chunks=1)) == 1
    assert all(len(key) == 32 for key in k.keys(list(range(12))))   # sha256, the default
    assert all(len(key) == 16 for key in ChunkKeyer(NS, 4, "xxh3_128").keys(list(range(12))))


def test_prefix_semantics_changed_early_token_changes_every_later_key():
    k = ChunkKeyer(NS, chunk_size=4)
    a = list(range(16))
    b = list(a)
    b[5] = 999  # inside chunk 1
    ka, kb = k.keys(a), k.keys(b)
    assert ka[0] == kb[0]
    assert all(x != y for x, y in zip(ka[1:], kb[1:]))
    # a shared prefix gives shared keys even when the tails differ
    assert k.keys(a + [1, 2, 3, 4])[:4] == ka


def test_namespace_separates_stores():
    toks = list(range(8))
    keys = {tuple(ChunkKeyer(ns, 4).keys(toks)) for ns in
            [NS, Namespace("m", "float32", "vllm_cpu"), Namespace("other", "bfloat16", "vllm_cpu"),
             Namespace("m", "bfloat16", "vllm_cpu", tp_rank=1, tp_size=2),
             Namespace("m", "bfloat16", "vllm_cpu", codec="int8")]}
    assert len(keys) == 5


@pytest.mark.parametrize("hash_name", ["xxh3_128", "sha256"])
def test_input_types_give_equal_keys(hash_name):
    k = ChunkKeyer(NS, 4, hash_name)
    toks = [7, 3, 100_000, 0, 5, 5, 5, 5]
    assert k.keys(toks) == k.keys(np.array(toks)) == k.keys(torch.tensor(toks)) == k.keys(tuple(toks))


@pytest.mark.parametrize("bad", [[-1, 2, 3, 4], [2**32, 1, 1, 1], [1.5, 2, 3, 4], np.zeros((2, 2), dtype=int)])
def test_invalid_tokens_are_rejected(bad):
    with pytest.raises(ValueError, match="token"):
        ChunkKeyer(NS, 2).keys(bad)


def test_keys_are_stable_across_processes():
    """Never Python's salted hash(): a fresh interpreter (other PYTHONHASHSEED) computes the same keys."""
    code = ("from lmcache_lab.keys import ChunkKeyer, Namespace;"
            "ns = Namespace(model='m', kv_dtype='bfloat16', layout='vllm_cpu');"
            "print(','.join(k.hex() for k in ChunkKeyer(ns, 4, '{h}').keys(list(range(20)))))")
    for h in ("xxh3_128", "sha256"):
        out = subprocess.run([sys.executable, "-c", code.format(h=h)], capture_output=True, text=True, check=True,
                             env={"PYTHONHASHSEED": "12345", "PATH": ""}).stdout.strip()
        assert out == ",".join(k.hex() for k in ChunkKeyer(NS, 4, h).keys(list(range(20))))


def test_known_value_pins_the_format():
    """Keys are a persisted format (disk, Redis): changing them silently orphans every store."""
    import hashlib

    import xxhash
    tokens = bytes([1, 0, 0, 0, 2, 0, 0, 0])
    k = ChunkKeyer(Namespace(model="m"), 2)
    assert k.hash_name == "sha256"
    root = hashlib.sha256(Namespace(model="m").seed()).digest()
    assert k.keys([1, 2])[0] == hashlib.sha256(root + tokens).digest()
    root = xxhash.xxh3_128_digest(Namespace(model="m").seed())
    assert ChunkKeyer(Namespace(model="m"), 2, "xxh3_128").keys([1, 2])[0] == xxhash.xxh3_128_digest(root + tokens)


def test_request_identity_seeds_the_chain_and_its_fields_cannot_stand_for_each_other():
    keyer = ChunkKeyer(Namespace(model="m"), chunk_size=4)
    toks = list(range(12))
    base = keyer.keys(toks)
    assert keyer.keys(toks, identity=()) == base                       # no identity: the root
    salted = keyer.keys(toks, identity=(("cache_salt", "a"),))
    lora = keyer.keys(toks, identity=(("lora", "a"),))
    assert len({base[0], salted[0], lora[0]}) == 3                       # tag separates fields
    assert not set(base) & set(salted) and not set(salted) & set(lora)   # every key differs
    assert keyer.keys(toks, identity=(("cache_salt", "a"),)) == salted   # deterministic
    # length prefixes: moving bytes between tag and value, or between fields, changes the root
    assert keyer.request_root((("ab", "c"),)) != keyer.request_root((("a", "bc"),))
    assert keyer.request_root((("lora", "x"), ("cache_salt", "y"))) != \
        keyer.request_root((("lora", "x\x00\x00\x00\x0acache_salt"),))
    assert keyer.request_root((("lora", "x"), ("cache_salt", "y"))) != \
        keyer.request_root((("cache_salt", "y"), ("lora", "x")))
    with pytest.raises(ValueError):
        keyer.request_root((("lora", 3),))


@pytest.mark.parametrize("hash_name", ["xxh3_128", "sha256"])
def test_a_store_secret_roots_every_key(hash_name):
    """Deployments with different secrets (or none) share no key; the same secret gives the same keys."""
    toks = list(range(12))
    keys = {secret: ChunkKeyer(NS, 4, hash_name, secret).keys(toks) for secret in (None, b"a" * 16, b"b" * 16)}
    assert ChunkKeyer(NS, 4, hash_name, b"a" * 16).keys(toks) == keys[b"a" * 16]
    flat = [k for chain in keys.values() for k in chain]
    assert len(set(flat)) == len(flat)
