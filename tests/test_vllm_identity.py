"""What makes KV bytes differ, checked on vLLM's real objects: a VllmConfig of a local tiny Llama,
real `Request`s and `LoRARequest`s pointing at adapters written here (no model hub, no engine)."""
from __future__ import annotations

import builtins
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lmcache_lab.integrations import vllm_identity as vi
from lmcache_lab.experiments.tiny_model import TinyModelSpec, build_tiny_model

pytest.importorskip("vllm.config")
from vllm.config import CacheConfig, LoadConfig, ModelConfig, VllmConfig  # noqa: E402
from vllm.lora.request import LoRARequest  # noqa: E402
from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.core.kv_cache_utils import generate_block_hash_extra_keys  # noqa: E402
from vllm.v1.request import Request  # noqa: E402

SPEC = TinyModelSpec(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=512,
                     max_position=2048)
PER_FILE = 8 + vi.SAMPLES_PER_FILE * vi.SAMPLE_BYTES   # + the header, for safetensors


# ------------------------------------------------------------------------------ helpers
# A fresh interpreter computes the fingerprint of the same model. It is started before the model
# is built and imports vLLM while this process runs the other tests; it reads the model directory
# from stdin (test_fingerprint_is_stable_across_processes, last in this file, collects it).
CHILD = """
import sys
from vllm.config import CacheConfig, LoadConfig, ModelConfig, VllmConfig
from lmcache_lab.integrations.vllm_identity import model_fingerprint
model = sys.stdin.readline().strip()
vc = VllmConfig(model_config=ModelConfig(model=model), cache_config=CacheConfig(cache_dtype="auto"),
                load_config=LoadConfig(load_format="auto"))
print("FP", model_fingerprint(vc), flush=True)
"""


@pytest.fixture(scope="module")
def other_process(tmp_path_factory):
    log = tmp_path_factory.mktemp("child") / "out.txt"
    env = dict(os.environ, PYTHONHASHSEED="12345", HF_HUB_OFFLINE="1")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE,
                                stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
    yield proc, log
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, other_process) -> Path:
    path = build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", SPEC)
    proc, _ = other_process
    proc.stdin.write(f"{path}\n")
    proc.stdin.close()
    return path


@pytest.fixture
def model_copy(model_dir, tmp_path) -> Path:
    """A private copy of the tiny model that a test may edit."""
    return Path(shutil.copytree(model_dir, tmp_path / "model"))


def make_config(model: Path | str, cache_dtype: str = "auto", load_format: str = "auto",
                **model_kwargs) -> VllmConfig:
    return VllmConfig(model_config=ModelConfig(model=str(model), **model_kwargs),
                      cache_config=CacheConfig(cache_dtype=cache_dtype),
                      load_config=LoadConfig(load_format=load_format))


class ReadCounter:
    """Wraps `open` for the duration of a test; counts the bytes every read returns, per file."""

    def __init__(self, monkeypatch):
        self.by_file: dict[str, int] = {}
        real_open = builtins.open
        counter = self

        class Counted:
            def __init__(self, f, name):
                self._f, self._name = f, name

            def read(self, *a):
                data = self._f.read(*a)
                counter.by_file[self._name] = counter.by_file.get(self._name, 0) + len(data)
                return data

            def readall(self):
                return self.read()

            def __getattr__(self, item):
                return getattr(self._f, item)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self._f.close()

        def counting_open(file, mode="r", *a, **kw):
            f = real_open(file, mode, *a, **kw)
            return Counted(f, str(file)) if "b" in mode else f

        monkeypatch.setattr(builtins, "open", counting_open)

    @property
    def total(self) -> int:
        return sum(self.by_file.values())


def data_start(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def write_adapter(path: Path, seed: int, alpha: int = 8) -> Path:
    """A PEFT-style LoRA adapter for the tiny model: adapter_config.json + random A/B matrices."""
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    r, hidden = 4, SPEC.hidden
    tensors = {}
    for layer in range(SPEC.layers):
        base = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        tensors[f"{base}.lora_A.weight"] = torch.randn(r, hidden, generator=g)
        tensors[f"{base}.lora_B.weight"] = torch.randn(hidden, r, generator=g)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj"],
        "lora_dropout": 0.0, "bias": "none", "base_model_name_or_path": "tiny"}))
    return path


def make_request(prompt=None, **kwargs) -> Request:
    if prompt is None and "prompt_embeds" not in kwargs:
        prompt = list(range(32))
    return Request(request_id="r", prompt_token_ids=prompt,
                   sampling_params=SamplingParams(max_tokens=4), pooling_params=None, **kwargs)


# ------------------------------------------------------------------------------ model
def test_fields_come_from_the_vllm_config(model_dir):
    fields = vi.model_identity_fields(make_config(model_dir))
    assert fields["dtype"] == "bfloat16"            # float32 checkpoint, "auto" -> bf16 on CPU
    assert fields["kv_cache_dtype"] == "auto" and fields["quantization"] is None
    assert fields["arch"]["total_num_hidden_layers"] == SPEC.layers
    assert fields["arch"]["total_num_kv_heads"] == SPEC.kv_heads
    assert fields["arch"]["head_size"] == SPEC.hidden // SPEC.heads
    assert fields["rope"] == [{"rope_theta": 10000.0, "rope_type": "default"}]
    assert fields["hf_config"]["max_position_embeddings"] == SPEC.max_position
    assert "_name_or_path" not in fields["hf_config"]       # content, not location
    weights = vi.weights_identity(make_config(model_dir))
    assert weights["source"] == "dir"
    assert {"model.safetensors", "config.json"} <= set(weights["files"])
    assert not {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} & set(
        weights["files"])


def test_fingerprint_is_stable_across_calls(model_dir):
    fp = vi.model_fingerprint(make_config(model_dir))
    assert len(fp) == 32 and int(fp, 16) >= 0
    assert vi.model_fingerprint(make_config(model_dir)) == fp


def test_fingerprint_is_about_content_not_location(model_dir, model_copy):
    assert vi.model_fingerprint(make_config(model_copy)) == vi.model_fingerprint(
        make_config(model_dir))


def test_a_weight_byte_in_a_sampled_range_changes_it(model_copy):
    vc = make_config(model_copy)
    before = vi.model_fingerprint(vc)
    st = model_copy / "model.safetensors"
    ranges = vi.sample_ranges(data_start(st), st.stat().st_size)
    assert len(ranges) == 3, "the tiny model's weights must be bigger than the samples"
    for lo, hi in ranges:
        flip_byte(st, (lo + hi) // 2)
        after = vi.model_fingerprint(vc)
        assert after != before
        before = after


def test_a_weight_byte_outside_the_sampled_ranges_is_not_seen(model_copy):
    """The documented trade-off: same-size in-place edits between samples go unnoticed."""
    vc = make_config(model_copy)
    before = vi.model_fingerprint(vc)
    st = model_copy / "model.safetensors"
    (_, first_end), (mid_lo, _), _ = vi.sample_ranges(data_start(st), st.stat().st_size)
    flip_byte(st, (first_end + mid_lo) // 2)
    assert vi.model_fingerprint(vc) == before


@pytest.mark.parametrize("edit", ["shape", "dtype", "rename"])
def test_a_header_change_changes_it(model_copy, edit):
    vc = make_config(model_copy)
    before = vi.model_fingerprint(vc)
    st = model_copy / "model.safetensors"
    with safe_open(str(st), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(st))
    name = "model.layers.0.self_attn.k_proj.weight"
    t = tensors.pop(name)
    if edit == "shape":         # the same bytes, another shape: only the header differs
        tensors[name] = t.reshape(t.shape[1], t.shape[0]).contiguous()
    elif edit == "dtype":
        tensors[name] = t.to(torch.float16)
    else:
        tensors[name.replace("k_proj", "k_proj_renamed")] = t
    old_data = st.read_bytes()[data_start(st):]
    save_file(tensors, str(st), metadata=metadata)
    if edit == "shape":
        assert st.read_bytes()[data_start(st):] == old_data
    assert vi.model_fingerprint(vc) != before


def test_a_new_weight_shard_changes_it(model_copy):
    before = vi.model_fingerprint(make_config(model_copy))
    save_file({"extra.weight": torch.zeros(4)}, str(model_copy / "extra.safetensors"))
    assert vi.model_fingerprint(make_config(model_copy)) != before


@pytest.mark.parametrize("kwargs", [
    {"cache_dtype": "fp8"},
    {"quantization": "fp8_per_tensor"},
    {"dtype": "float32"},
    {"revision": "v2"},
    {"hf_overrides": {"rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                          "rope_theta": 10000.0}}},
    {"hf_overrides": {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}},
    {"hf_overrides": {"max_position_embeddings": 4096}},
    {"hf_overrides": {"rms_norm_eps": 1e-5}},
    {"load_format": "dummy"},
], ids=["kv_cache_dtype", "quantization", "dtype", "revision", "rope_scaling", "rope_theta",
        "max_position", "norm_eps", "dummy_weights"])
def test_settings_that_change_kv_change_it(model_dir, kwargs):
    base = vi.model_fingerprint(make_config(model_dir))
    assert vi.model_fingerprint(make_config(model_dir, **kwargs)) != base


def _override_factory(eps: float | None):
    def override(cfg):              # the same qualified name, whatever it does
        if eps is not None:
            cfg.rms_norm_eps = eps
        return cfg
    return override


def test_a_callable_hf_override_counts_by_its_effect(model_dir):
    """A function in hf_overrides is only named in the fields; the config it produces counts."""
    noop = vi.model_fingerprint(make_config(model_dir, hf_overrides=_override_factory(None)))
    edit = vi.model_fingerprint(make_config(model_dir, hf_overrides=_override_factory(1e-5)))
    assert noop != edit


def test_rope_scaling_reaches_the_rope_field(model_dir):
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    fields = vi.model_identity_fields(make_config(model_dir, hf_overrides={"rope_parameters": rope}))
    assert fields["rope"] == [rope]


def test_fields_are_plain_data_or_an_error():
    """vLLM's config dataclasses become plain data; an unknown object is an error naming the field,
    never a repr (which could hold an address and differ per process)."""
    from vllm.config.quantization import QuantizationConfigArgs

    got = vi._canonical({"q": QuantizationConfigArgs(ignore=["lm_head"]), "dt": torch.float16},
                        "model_config")
    assert got["q"]["ignore"] == ["lm_head"] and got["dt"] == "float16"
    json.dumps(got)
    with pytest.raises(TypeError, match=r"model_config\.odd"):
        vi._canonical({"odd": object()}, "model_config")


def test_sample_ranges_are_bounded_and_disjoint():
    s = vi.SAMPLE_BYTES
    assert vi.sample_ranges(10, 10) == []
    assert vi.sample_ranges(10, 10 + 3 * s) == [(10, 10 + 3 * s)]
    for size in (3 * s + 1, 10 * s + 7, 10**9):
        r = vi.sample_ranges(100, 100 + size)
        assert [hi - lo for lo, hi in r] == [s, s, s]
        assert r[0][0] == 100 and r[-1][1] == 100 + size
        assert all(a[1] <= b[0] for a, b in zip(r, r[1:]))


def test_reads_a_bounded_number_of_bytes(model_dir, tmp_path, monkeypatch):
    # a model: the only weight file is read in part
    vc = make_config(model_dir)
    counter = ReadCounter(monkeypatch)
    vi.model_fingerprint(vc)
    st = model_dir / "model.safetensors"
    assert counter.by_file[str(st)] <= PER_FILE + data_start(st)
    assert counter.by_file[str(st)] < st.stat().st_size / 2
    # a directory of large files in several formats: bounded per file, whatever the size
    big = tmp_path / "big"
    big.mkdir()
    save_file({"w": torch.zeros(1024, 1024)}, str(big / "model.safetensors"))       # 4 MiB
    torch.save({"w": torch.zeros(512, 1024)}, big / "pytorch_model.bin")           # 2 MiB
    counter.by_file.clear()
    fps = vi.directory_fingerprint(big)
    assert set(fps) == {"model.safetensors", "pytorch_model.bin"}
    for name in fps:
        p = big / name
        assert counter.by_file[str(p)] <= PER_FILE + data_start(p) * (p.suffix == ".safetensors")
    assert counter.total < 0.1 * sum((big / n).stat().st_size for n in fps)


def test_an_unreadable_weight_file_raises_naming_it(model_copy):
    vc = make_config(model_copy)
    bad = model_copy / "model-00002-of-00002.safetensors"
    bad.symlink_to(model_copy / "gone.safetensors")             # dangling
    with pytest.raises(vi.FingerprintError, match="model-00002-of-00002.safetensors"):
        vi.model_fingerprint(vc)
    bad.unlink()
    bad.write_bytes(struct.pack("<Q", 10**6) + b"{}")           # header longer than the file
    with pytest.raises(vi.FingerprintError, match="model-00002-of-00002.safetensors"):
        vi.model_fingerprint(vc)
    bad.write_bytes(struct.pack("<Q", 2) + b"[]")               # header not an object
    with pytest.raises(vi.FingerprintError, match="not a JSON object"):
        vi.model_fingerprint(vc)


def test_a_directory_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(vi.FingerprintError, match="no weight file"):
        vi.directory_fingerprint(tmp_path)


def test_a_hub_id_falls_back_to_name_and_revision(model_dir):
    vc = make_config(model_dir)
    vc.model_config.model = "org/some-model"     # as vLLM keeps it for a model it downloads
    vc.model_config.revision = "abc123"
    assert vi.weights_identity(vc) == {"source": "hub", "name": "org/some-model",
                                       "revision": "abc123"}
    fp = vi.model_fingerprint(vc)
    vc.model_config.revision = "def456"
    assert vi.model_fingerprint(vc) != fp


def test_pipeline_rank_without_pipeline_parallelism(model_dir):
    assert vi.pipeline_rank(make_config(model_dir)) == (0, 1)


# ------------------------------------------------------------------------------ LoRA
def test_no_lora_no_identity():
    assert vi.lora_identity(None) is None


def test_lora_identity_ignores_the_process_local_int_id(tmp_path):
    a = write_adapter(tmp_path / "a", seed=1)
    one = LoRARequest("tenant", 1, str(a))
    two = LoRARequest("tenant", 7, str(a))
    assert vi.lora_identity(one) == vi.lora_identity(two)
    assert len(vi.lora_identity(one)) == 32


def test_lora_identity_separates_paths_names_and_contents(tmp_path):
    a = write_adapter(tmp_path / "a", seed=1)
    b = write_adapter(tmp_path / "b", seed=1)                    # same bytes, other path
    ids = {vi.lora_identity(LoRARequest("tenant", 1, str(a))),
           vi.lora_identity(LoRARequest("tenant", 1, str(b))),
           vi.lora_identity(LoRARequest("other", 1, str(a)))}
    assert len(ids) == 3


def test_lora_identity_follows_rewritten_weights_and_config(tmp_path):
    a = write_adapter(tmp_path / "a", seed=1)
    req = LoRARequest("tenant", 1, str(a))
    first = vi.lora_identity(req)
    write_adapter(a, seed=2)                                     # same shapes, new values
    second = vi.lora_identity(req)
    assert second != first
    write_adapter(a, seed=2, alpha=16)                           # only the config changes
    assert vi.lora_identity(req) not in (first, second)


def settle(directory: Path) -> None:
    """Date the adapter's files back, as if written well before the first request."""
    past = time.time_ns() - 10 * vi.LORA_SETTLE_NS
    for p in directory.iterdir():
        os.utime(p, ns=(past, past))


def test_lora_identity_is_cached_per_path_and_mtime(tmp_path, monkeypatch):
    a = write_adapter(tmp_path / "a", seed=3)
    settle(a)
    req = LoRARequest("tenant", 1, str(a))
    counter = ReadCounter(monkeypatch)
    first = vi.lora_identity(req)
    assert counter.total > 0
    counter.by_file.clear()
    for _ in range(5):
        assert vi.lora_identity(req) == first
    assert counter.total == 0
    write_adapter(a, seed=4)                 # rewritten in place: new mtime, so read again
    assert vi.lora_identity(req) != first
    assert counter.total > 0


def test_a_lora_rewritten_within_one_clock_tick_is_not_missed(tmp_path):
    """Same size, same inode, same mtime (a coarse file clock): only the settle rule catches it."""
    a = write_adapter(tmp_path / "a", seed=5)
    req = LoRARequest("tenant", 1, str(a))
    before = {p.name: p.stat() for p in a.iterdir()}
    first = vi.lora_identity(req)
    new = write_adapter(tmp_path / "new", seed=6) / "adapter_model.safetensors"
    with open(a / "adapter_model.safetensors", "r+b") as f:     # in place: same inode
        f.write(new.read_bytes())
    for p in a.iterdir():
        os.utime(p, ns=(before[p.name].st_atime_ns, before[p.name].st_mtime_ns))
    assert vi._stat_signature(sorted(a.iterdir())) == tuple(
        (n, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev) for n, st in sorted(before.items()))
    assert vi.lora_identity(req) != first


def test_lora_from_the_hub_is_named_not_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                                 # no such relative directory
    one = vi.lora_identity(LoRARequest("tenant", 1, "org/adapter"))
    assert one != vi.lora_identity(LoRARequest("tenant", 1, "org/other-adapter"))
    with pytest.raises(vi.FingerprintError, match="not a directory"):
        vi.lora_identity(LoRARequest("tenant", 1, str(tmp_path / "missing")))
    (tmp_path / "noconfig").mkdir()
    with pytest.raises(vi.FingerprintError, match="adapter_config.json"):
        vi.lora_identity(LoRARequest("tenant", 1, str(tmp_path / "noconfig")))


# ------------------------------------------------------------------------------ requests
def test_plain_request_has_an_empty_identity():
    assert vi.request_identity(make_request()) == ()
    assert vi.request_identity(make_request(cache_salt="")) == ()   # vLLM: empty salt = none


def test_request_identity_is_tagged_and_ordered(tmp_path):
    lora = LoRARequest("tenant", 1, str(write_adapter(tmp_path / "a", seed=1)))
    lid = vi.lora_identity(lora)
    assert vi.request_identity(make_request(lora_request=lora)) == (("lora", lid),)
    assert vi.request_identity(make_request(cache_salt="s1")) == (("cache_salt", "s1"),)
    both = make_request(lora_request=lora, cache_salt="s1")
    assert vi.request_identity(both) == (("lora", lid), ("cache_salt", "s1"))
    assert vi.request_identity(both) == vi.request_identity(
        make_request(cache_salt="s1", lora_request=lora))


def test_request_identity_mirrors_vllm_extra_keys(tmp_path):
    """Every non-multimodal field vLLM folds into a first block's hash has a pair here, in the
    same order (a field vLLM adds for token-only requests shows up as a mismatch)."""
    lora = LoRARequest("tenant", 1, str(write_adapter(tmp_path / "a", seed=1)))
    for kwargs in ({}, {"lora_request": lora}, {"cache_salt": "s"},
                   {"lora_request": lora, "cache_salt": "s"}):
        req = make_request(**kwargs)
        keys, _ = generate_block_hash_extra_keys(req, 0, 16, 0)
        vllm_tags = [k[0] for k in keys or ()]
        assert [tag for tag, _ in vi.request_identity(req)] == vllm_tags, kwargs


def test_a_lora_name_equal_to_a_salt_is_not_that_salt(tmp_path):
    lora = LoRARequest("tenant-a", 1, str(write_adapter(tmp_path / "a", seed=1)))
    with_lora = vi.request_identity(make_request(lora_request=lora))
    with_salt = vi.request_identity(make_request(cache_salt="tenant-a"))
    forged = vi.request_identity(make_request(cache_salt=vi.lora_identity(lora)))
    assert len({with_lora, with_salt, forged}) == 3
    assert len({vi.encode_identity(x) for x in (with_lora, with_salt, forged)}) == 3


def test_requests_whose_kv_is_not_a_function_of_tokens_are_refused():
    embeds = make_request(prompt=None, prompt_embeds=torch.randn(32, SPEC.hidden))
    assert vi.unsupported_reason(embeds) == "prompt embeddings"
    mixed = make_request(prompt=list(range(8)), prompt_embeds=torch.randn(8, SPEC.hidden),
                         prompt_is_token_ids=[True] * 4 + [False] * 4)
    assert vi.unsupported_reason(mixed) is not None
    mm = make_request(mm_features=[MultiModalFeatureSpec(
        data=None, modality="image", identifier="img-hash",
        mm_position=PlaceholderRange(offset=4, length=8))])
    assert vi.unsupported_reason(mm) == "multimodal inputs"
    for req in (embeds, mixed, mm):
        assert vi.request_identity(req) is None
    assert vi.unsupported_reason(make_request()) is None


# ------------------------------------------------------------------------------ last: another process
def test_fingerprint_is_stable_across_processes(model_dir, other_process):
    proc, log = other_process
    proc.wait(timeout=180)
    out = log.read_text()
    assert proc.returncode == 0, out[-3000:]
    (line,) = [x for x in out.splitlines() if x.startswith("FP ")]
    assert line.split()[1] == vi.model_fingerprint(make_config(model_dir))
