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


SECRET = "correct-horse-battery-staple-42"


def test_store_secret_from_a_literal_a_file_or_the_environment(tmp_path, monkeypatch):
    (tmp_path / "secret").write_text(SECRET + "\n")
    monkeypatch.setenv("CACHE_SECRET", SECRET)
    for spec in (SECRET, f"file:{tmp_path / 'secret'}", "env:CACHE_SECRET"):
        cfg = CacheConfig.from_dict({"store_secret": spec})
        assert cfg.store_secret.reveal() == SECRET.encode()
    assert CacheConfig().store_secret is None
    # LMCACHE_LAB_STORE_SECRET reaches every process that loads its config from the environment
    env = {"LMCACHE_LAB_STORE_SECRET": "env:CACHE_SECRET"}
    assert load_config({}, environ=env).store_secret.reveal() == SECRET.encode()


def test_store_secret_is_never_shown(monkeypatch):
    import dataclasses
    import json

    monkeypatch.setenv("CACHE_SECRET", SECRET)
    for spec in (SECRET, "env:CACHE_SECRET"):
        cfg = CacheConfig.from_dict({"store_secret": spec})
        shown = [repr(cfg), str(cfg), str(cfg.to_dict()), repr(cfg.store_secret),
                 json.dumps(dataclasses.asdict(cfg), default=str)]
        assert not any(SECRET in text for text in shown)
        assert "store_secret" not in cfg.to_dict()


@pytest.mark.parametrize("spec,needle", [
    ("short", "store_secret: the secret from a literal has 5 bytes; use at least 16"),
    ("file:/nonexistent/secret", "store_secret: cannot read the secret file '/nonexistent/secret'"),
    ("env:LMCACHE_LAB_TEST_UNSET_SECRET", "store_secret: the environment variable "
                                          "'LMCACHE_LAB_TEST_UNSET_SECRET' is not set"),
    (12345678901234567890, "store_secret: expected a string (a literal, file:/path or env:NAME), got a int"),
])
def test_invalid_store_secrets_name_the_source_never_the_value(spec, needle):
    with pytest.raises(ConfigError) as e:
        CacheConfig.from_dict({"store_secret": spec})
    assert needle in str(e.value) and "12345678901234567890" not in str(e.value)
