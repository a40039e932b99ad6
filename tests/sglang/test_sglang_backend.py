"""LMCacheLabStorage through SGLang's own factory and config classes: round trips, the prefix rule,
namespaces, the zero-copy path, bad input and corrupted data (memory and disk tiers)."""
from __future__ import annotations

import hashlib

import pytest
import torch
from host_pool import HostPool, page_indices
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageExtraInfo

from lmcache_lab.config import ConfigError
from lmcache_lab.integrations.sglang import LMCacheLabStorage

L, H, D, PAGE = 2, 2, 8, 4


def page_hashes(tokens: list[int], page: int = PAGE, prior: str | None = None) -> list[str]:
    """Chained SHA-256 hex page hashes, as SGLang names pages (one per full page)."""
    out = []
    for i in range(0, len(tokens) - page + 1, page):
        h = hashlib.sha256()
        if prior:
            h.update(bytes.fromhex(prior))
        h.update(torch.tensor(tokens[i:i + page], dtype=torch.int64).numpy().tobytes())
        prior = h.hexdigest()
        out.append(prior)
    return out


def pool(layout: str = "layer_first", seed: int | None = None, dtype=torch.float32) -> HostPool:
    p = HostPool(L, 64, H, D, PAGE, layout, dtype)
    if seed is not None:
        p.fill_random(seed)
    return p


def test_factory_loads_our_class_with_our_config(make_backend):
    backend = make_backend({"tiers": {"cpu": {"capacity_bytes": "1MiB"}}, "policy": {"name": "lfu"},
                            "interface_v1": 1}, pool=pool())
    assert isinstance(backend, LMCacheLabStorage) and isinstance(backend, HiCacheStorage)
    assert backend.engine.tiers[0].capacity_bytes == 2**20
    assert backend.config.policy.name == "lfu"
    assert backend.spec.layout is not None and backend.spec.shape == (2, L, PAGE, H * D)
    # SGLang reads interface_v1 from the same config object afterwards: it must still be there
    assert backend.storage_config.extra_config["interface_v1"] == 1


def test_factory_reports_a_bad_config_key(make_backend):
    with pytest.raises(ConfigError, match="tierz"):
        make_backend({"tierz": {}})
    with pytest.raises(ConfigError, match="io_timeout_s"):
        make_backend({"io_timeout_s": 0})


def test_generic_round_trip_exact_bytes(make_backend):
    src = pool(seed=1)
    backend = make_backend(pool=src)
    keys = page_hashes(list(range(16)))
    pages = [src.get_data_page(i * PAGE) for i in range(4)]  # views, as SGLang passes them
    assert backend.batch_set(keys, pages)
    want = [p.clone() for p in pages]
    src.kv_buffer.zero_()                                   # the stored pages must be copies
    targets = [src.get_dummy_flat_data_page() for _ in keys]
    got = backend.batch_get(keys, targets)
    for g, t, w in zip(got, targets, want):
        assert g is t and torch.equal(g, w)
    assert backend.get(keys[2]).view(-1).equal(want[2])
    assert backend.get(page_hashes(list(range(100, 104)))[0]) is None
    assert backend.exists(keys[0]) and not backend.exists("f" * 64)


def test_batch_exists_is_the_present_prefix(make_backend):
    src = pool(seed=2)
    backend = make_backend(pool=src)
    keys = page_hashes(list(range(6 * PAGE)))
    for i in (0, 1, 2, 4, 5):
        assert backend.set(keys[i], src.get_data_page(i * PAGE))
    assert backend.batch_exists(keys) == 3
    assert backend.batch_exists(keys[3:]) == 0
    assert backend.batch_exists(keys[4:]) == 2
    assert backend.batch_exists([]) == 0
    # batch_get follows the same rule: nothing after the first miss
    got = backend.batch_get(keys)
    assert [g is not None for g in got] == [True, True, True, False, False, False]


@pytest.mark.parametrize("layout", ["layer_first", "page_first"])
def test_v1_zero_copy_round_trip(make_backend, layout):
    src, dst = pool(layout, seed=3), pool(layout)
    writer, reader = make_backend({"interface_v1": 1}, pool=src), make_backend({"interface_v1": 1}, pool=dst)
    assert (writer.spec.layout is not None) == (layout == "layer_first")   # kernels where they fit
    keys = page_hashes(list(range(5 * PAGE)))
    src_idx, dst_idx = page_indices(2, 5, PAGE), page_indices(9, 5, PAGE)
    info = HiCacheStorageExtraInfo(prefix_keys=[])
    assert writer.batch_set_v1(keys[:3], src_idx[:3 * PAGE], info) == [True] * 3
    assert writer.batch_set_v1(keys[3:], src_idx[3 * PAGE:], HiCacheStorageExtraInfo(prefix_keys=keys[:3])) \
        == [True, True]
    # reader is another instance without shared tiers: nothing there
    assert reader.batch_get_v1(keys, dst_idx) == [False] * 5
    assert writer.batch_exists(keys) == 5
    before = dst.kv_buffer.clone()
    writer.register_mem_pool_host(dst)          # same pool geometry, so the same namespace
    assert writer.batch_get_v1(keys, dst_idx) == [True] * 5
    assert all(torch.equal(a, b) for a, b in zip(dst.pages(dst_idx), src.pages(src_idx)))
    untouched = torch.ones(dst.size, dtype=torch.bool)
    untouched[dst_idx] = False
    rows = dst.kv_buffer[:, :, untouched] if layout == "layer_first" else dst.kv_buffer[:, untouched]
    before_rows = before[:, :, untouched] if layout == "layer_first" else before[:, untouched]
    assert torch.equal(rows, before_rows)       # no host page outside host_indices written


def test_v1_and_generic_paths_share_pages(make_backend):
    src, dst = pool(seed=4), pool()
    backend = make_backend(pool=src)
    keys = page_hashes(list(range(2 * PAGE)))
    assert backend.batch_set(keys, [src.get_data_page(0), src.get_data_page(PAGE)])
    backend.register_mem_pool_host(dst)
    assert backend.batch_get_v1(keys, page_indices(3, 2, PAGE)) == [True, True]
    assert torch.equal(dst.get_data_page(3 * PAGE), src.get_data_page(0))
    assert torch.equal(dst.get_data_page(4 * PAGE), src.get_data_page(PAGE))


def test_v1_stops_at_the_first_miss_and_writes_nothing_after_it(make_backend):
    src, dst = pool(seed=5), pool()
    backend = make_backend(pool=src)
    keys = page_hashes(list(range(4 * PAGE)))
    assert backend.batch_set_v1(keys[:2], page_indices(0, 2, PAGE)) == [True, True]
    assert backend.set(keys[3], src.get_data_page(3 * PAGE))
    backend.register_mem_pool_host(dst)
    assert backend.batch_get_v1(keys, page_indices(0, 4, PAGE)) == [True, True, False, False]
    assert torch.count_nonzero(dst.get_data_page(3 * PAGE)) == 0


def test_namespace_separates_what_changes_kv(make_backend, tmp_path):
    """Backends over one disk folder (its index is read at start-up: each check is a new backend)."""
    keys = page_hashes(list(range(PAGE)))
    src = pool(seed=6)

    def backend(pool_=src, **kw) -> LMCacheLabStorage:
        return make_backend({"tiers": {"cpu": {"capacity_bytes": 0}, "disk": {"path": str(tmp_path)}}},
                            pool=pool_, **kw)

    writer = backend(tp_rank=0, tp_size=2)
    assert writer.batch_set_v1(keys, page_indices(0, 1, PAGE)) == [True]
    writer.flush()                                                   # disk is written behind
    assert backend(tp_rank=0, tp_size=2).batch_exists(keys) == 1           # same everything
    assert backend(tp_rank=1, tp_size=2).batch_exists(keys) == 0           # MHA: per rank
    assert backend(tp_rank=0, tp_size=1).batch_exists(keys) == 0
    assert backend(tp_rank=0, tp_size=2, model="other").batch_exists(keys) == 0
    assert backend(pool("page_first"), tp_rank=0, tp_size=2).batch_exists(keys) == 0
    assert backend(pool(dtype=torch.bfloat16), tp_rank=0, tp_size=2).batch_exists(keys) == 0
    assert backend(HostPool(L, 64, H, D, 2 * PAGE), tp_rank=0, tp_size=2).batch_exists(
        page_hashes(list(range(PAGE)), page=2 * PAGE)) == 0
    # MLA: KV is replicated on every rank, so ranks share pages and only the writer rank writes
    mla_keys = page_hashes(list(range(50, 50 + PAGE)))
    m1 = backend(tp_rank=1, tp_size=2, mla=True)
    assert m1.batch_set_v1(mla_keys, page_indices(0, 1, PAGE)) == [True]
    assert m1.stats()["backend"]["skipped_writes"] == 1
    assert backend(tp_rank=0, tp_size=2, mla=True).batch_exists(mla_keys) == 0
    m0 = backend(tp_rank=0, tp_size=2, mla=True)
    assert m0.batch_set_v1(mla_keys, page_indices(0, 1, PAGE)) == [True]
    m0.flush()
    assert backend(tp_rank=1, tp_size=2, mla=True).batch_exists(mla_keys) == 1


def test_store_secrets_separate_deployments_on_one_disk_folder(make_backend, tmp_path, monkeypatch):
    """Page keys are rooted in the store secret, also after the host pool switched the
    namespace: another secret (or none) never sees the pages."""
    monkeypatch.setenv("SECRET_A", "the first deployment's secret")
    monkeypatch.setenv("SECRET_B", "the other deployment's secret")
    keys = page_hashes(list(range(100, 100 + PAGE)))

    def backend(secret: str | None) -> LMCacheLabStorage:
        extra = {"tiers": {"cpu": {"capacity_bytes": 0}, "disk": {"path": str(tmp_path)}}}
        if secret:
            extra["store_secret"] = f"env:{secret}"
        return make_backend(extra, pool=pool(seed=7))

    writer = backend("SECRET_A")
    assert writer.batch_set_v1(keys, page_indices(0, 1, PAGE)) == [True]
    writer.flush()
    assert backend("SECRET_A").batch_exists(keys) == 1
    assert backend("SECRET_B").batch_exists(keys) == 0
    assert backend(None).batch_exists(keys) == 0


def test_bad_input_is_refused_not_stored(make_backend):
    src = pool(seed=7)
    backend = make_backend(pool=src)
    key = page_hashes(list(range(PAGE)))[0]
    assert not backend.set(key, torch.zeros(3))                          # wrong size
    assert not backend.set(key, src.get_data_page(0).to(torch.float16))  # wrong dtype
    assert not backend.set(key, "not a tensor")
    assert not backend.batch_set([key, key], [src.get_data_page(0)])     # lengths differ
    assert backend.batch_exists([key]) == 0
    for bad in (None, b"bytes", "", "x" * 5000, 42, "\ud800"):
        assert backend.batch_exists([bad]) == 0
        assert backend.get(bad) is None
    assert backend.batch_get_v1([key], page_indices(0, 2, PAGE)) == [False]   # indices != pages
    assert backend.batch_set_v1([key], torch.tensor([0, 1], dtype=torch.int64)) == [False]
    assert backend.batch_set_v1([key], torch.tensor([999, 1000, 1001, 1002], dtype=torch.int64)) == [False]
    s = backend.stats()["backend"]
    assert s["bad_values"] >= 5 and s["bad_keys"] >= 6 and s["errors"] >= 1
    # a target that cannot hold the page: a miss, and the target is not written
    assert backend.set(key, src.get_data_page(0))
    small = torch.zeros(4)
    assert backend.get(key, small) is None and not small.any()


def test_corrupted_disk_values_are_misses(make_backend, tmp_path):
    src, dst = pool(seed=8), pool()
    cfg = {"tiers": {"cpu": {"capacity_bytes": 0}, "disk": {"path": str(tmp_path)}}}
    backend = make_backend(cfg, pool=src)
    keys = page_hashes(list(range(3 * PAGE)))
    assert backend.batch_set_v1(keys, page_indices(0, 3, PAGE)) == [True] * 3
    backend.flush()                                              # slow tiers are written behind
    files = sorted(tmp_path.glob("*/*.kvc"))
    assert len(files) == 3
    damaged = None
    for f in files:   # damage the second page of the chain
        if backend.tier_key(keys[1]).hex() in f.name:
            data = bytearray(f.read_bytes())
            data[-8:] = bytes(b ^ 0xFF for b in data[-8:])
            f.write_bytes(bytes(data))
            damaged = f
    assert damaged is not None
    reader = make_backend(cfg, pool=dst)   # a restart: the disk index is rebuilt from the files
    assert reader.batch_get_v1(keys, page_indices(0, 3, PAGE)) == [True, False, False]
    assert torch.equal(dst.get_data_page(0), src.get_data_page(0))
    assert torch.count_nonzero(dst.get_data_page(PAGE)) == 0
    assert reader.stats()["tiers"]["disk"]["corrupt"] == 1
    assert reader.batch_get(keys)[1] is None


def test_metrics_and_stats_count_hits_and_stores(make_backend):
    src = pool(seed=9)
    backend = make_backend({"interface_v1": 1}, pool=src)
    keys = page_hashes(list(range(4 * PAGE)))
    assert all(backend.batch_set_v1(keys[:2], page_indices(0, 2, PAGE)))
    assert backend.batch_exists(keys) == 2
    assert backend.batch_get_v1(keys[:2], page_indices(4, 2, PAGE)) == [True, True]
    m = backend.metrics
    assert m.value("lmcache_lab_stored_chunks_total") == 2
    assert m.value("lmcache_lab_lookup_tokens_total") == 4 * PAGE
    assert m.value("lmcache_lab_hit_tokens_total") == 2 * PAGE
    assert m.value("lmcache_lab_retrieved_chunks_total") == 2
    assert m.value("lmcache_lab_tier_chunks", tier="cpu") == 2
    s = backend.stats()
    assert s["engine"]["stored_chunks"] == 2 and s["tiers"]["cpu"]["hits"] >= 2
    stats = backend.get_stats()   # SGLang's StorageMetrics, where its module imports
    if stats is not None:
        assert stats.prefetch_pgs == [2] and stats.backup_pgs == [2]


def test_eviction_under_budget_keeps_the_prefix_rule(make_backend):
    """A full CPU tier makes room for a new chain by evicting an old chain's tail, never its
    head first; what is left of the old chain still loads as a prefix."""
    src = pool(seed=10)
    page_bytes = 2 * L * PAGE * H * D * 4
    backend = make_backend({"tiers": {"cpu": {"capacity_bytes": 3 * page_bytes}}}, pool=src)
    old, new = page_hashes(list(range(3 * PAGE))), page_hashes(list(range(1000, 1000 + 2 * PAGE)))
    assert backend.batch_set_v1(old, page_indices(0, 3, PAGE)) == [True] * 3
    assert backend.batch_set_v1(new, page_indices(3, 2, PAGE)) == [True, True]
    tier = backend.engine.tiers[0]
    assert tier.used_bytes <= tier.capacity_bytes and len(tier) == 3 and tier.stats.evictions == 2
    assert backend.batch_exists(new) == 2 and backend.batch_exists(old) == 1
    assert backend.batch_get_v1(old, page_indices(8, 3, PAGE)) == [True, False, False]
    assert torch.equal(src.get_data_page(8 * PAGE), src.get_data_page(0))


def test_concurrent_callers_get_exact_pages(make_backend):
    """SGLang calls the backend from its prefetch, prefetch-I/O and backup threads at once."""
    import threading

    src = pool(seed=14)
    backend = make_backend({"interface_v1": 1}, pool=src)
    chains = [page_hashes(list(range(t * 1000, t * 1000 + 3 * PAGE))) for t in range(4)]
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for _ in range(5):
                assert backend.batch_set_v1(chains[t], page_indices(3 * t, 3, PAGE)) == [True] * 3
                assert backend.batch_exists(chains[t]) == 3
                got = backend.batch_get(chains[t])
                for i, g in enumerate(got):
                    assert torch.equal(g.view(-1), src.get_data_page((3 * t + i) * PAGE))
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors
    assert backend.stats()["backend"] == {k: 0 for k in backend.stats()["backend"]}


def test_clear_empties_every_tier(make_backend, tmp_path):
    src = pool(seed=15)
    cfg = {"tiers": {"cpu": {"capacity_bytes": "1MiB"}, "disk": {"path": str(tmp_path)}}}
    backend = make_backend(cfg, pool=src)
    keys = page_hashes(list(range(2 * PAGE)))
    assert backend.batch_set_v1(keys, page_indices(0, 2, PAGE)) == [True, True]
    backend.flush()                                              # slow tiers are written behind
    assert len(list(tmp_path.glob("*/*.kvc"))) == 2
    assert backend.clear() is True
    assert backend.batch_exists(keys) == 0 and not list(tmp_path.glob("*/*.kvc"))
    assert all(len(t) == 0 and t.used_bytes == 0 for t in backend.engine.tiers)
