import pytest

from lmcache_lab.config import CacheConfig, ConfigError, load_config, parse_size


def test_defaults_match_documented_shape():
    cfg = CacheConfig()
    assert cfg.chunk_size == 256 and cfg.hash == "sha256" and cfg.codec == "none"
    assert cfg.policy.name == "lru" and cfg.tiers.cpu.capacity_bytes == 2 * 2**30
    assert cfg.tiers.disk.path is None and cfg.tiers.redis.url is None and cfg.metrics.port is None


@pytest.mark.parametrize("text,expected", [("512MiB", 512 * 2**20), ("2GB", 2 * 10**9), ("1048576", 2**20),
                                           (4096, 4096), ("1.5KiB", 1536), ("10 gib", 10 * 2**30)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("data,needle", [
    ({"chunk_size": 0}, "chunk_size"),
    ({"chunk_size": "big"}, "chunk_size"),
    ({"hash": "md5"}, "hash: 'md5' is not allowed; choose one of xxh3_128, sha256"),
    ({"codec": "zip"}, "codec: 'zip' is not allowed"),
    ({"policy": {"name": "random"}}, "policy.name: 'random' is not allowed; choose one of"),
    ({"tiers": {"cpu": {"capacity_bytes": "lots"}}}, "tiers.cpu.capacity_bytes"),
    ({"tiers": {"disk": {"pth": "/tmp"}}}, "tiers.disk.pth: unknown key; allowed keys are path, capacity_bytes"),
    ({"tiers": {"redis": {"url": "http://x"}}}, "tiers.redis.url"),
    ({"metrics": {"port": 70000}}, "metrics.port"),
    ({"chunk_sise": 128}, "chunk_sise: unknown key"),
])
def test_invalid_values_name_the_key(data, needle):
    with pytest.raises(ConfigError) as e:
        CacheConfig.from_dict(data)
    assert needle in str(e.value)


def test_policy_params_and_round_trip():
    cfg = CacheConfig.from_dict({"policy": {"name": "cost_aware", "model": "llama3_8b"}})
    assert cfg.policy.params == {"model": "llama3_8b"}
    assert CacheConfig.from_dict(cfg.to_dict()) == cfg


def test_yaml_env_and_overrides_compose(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("chunk_size: 128\ntiers:\n  cpu: {capacity_bytes: 1GiB}\n  disk: {path: /tmp/x}\n")
    env = {"LMCACHE_LAB_TIERS__CPU__CAPACITY_BYTES": "512MiB", "LMCACHE_LAB_POLICY__NAME": "lfu",
           "LMCACHE_LAB_CONFIG_FILE": str(f), "OTHER": "1"}
    cfg = load_config(None, environ=env)
    assert cfg.chunk_size == 128                              # from the file
    assert cfg.tiers.cpu.capacity_bytes == 512 * 2**20        # env beats file
    assert cfg.policy.name == "lfu" and cfg.tiers.disk.path == "/tmp/x"
    cfg = load_config({"config_file": str(f), "chunk_size": 512}, environ={})
    assert cfg.chunk_size == 512 and cfg.tiers.disk.path == "/tmp/x"   # mapping beats file


def test_env_value_errors_name_the_key():
    with pytest.raises(ConfigError, match="chunk_size"):
        load_config(None, environ={"LMCACHE_LAB_CHUNK_SIZE": "-3"})
