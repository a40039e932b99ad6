"""lmcache_lab: a KV-cache reuse layer for LLM serving, and a lab to study it."""
from lmcache_lab.config import CacheConfig, ConfigError, load_config
from lmcache_lab.engine import CacheEngine
from lmcache_lab.keys import ChunkKeyer, Namespace

__all__ = ["CacheConfig", "CacheEngine", "ChunkKeyer", "ConfigError", "Namespace", "load_config"]
__version__ = "0.1.0"
