"""Hydra entry point: `python -m lmcache_lab.run [+]policy=lfu [experiment=...] [key=value ...]`
(installed as the `lmcache-lab` command, which does the same).

The experiment named by `experiment` (a config group in conf/experiment/) runs with the composed
config and writes into Hydra's run directory. Groups that have a default (policy, workload, ...)
accept both `group=option` and `+group=option`: `+` appends a group that is *not* in the defaults
list, and Hydra refuses it for one that is, so the entry point rewrites `+group=` to `group=` for
those groups before Hydra reads the command line.

The configs are found through the package `lmcache_lab.conf` (the checkout's `conf/`, shipped in
the wheel), so the entry point works from any directory.
"""
from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

import hydra
import yaml
from omegaconf import DictConfig

CONF_DIR = Path(str(resources.files("lmcache_lab.conf")))


def groups_with_default(conf_dir: Path = CONF_DIR) -> set[str]:
    defaults = yaml.safe_load((conf_dir / "config.yaml").read_text()).get("defaults", [])
    return {next(iter(d)) for d in defaults if isinstance(d, dict)}


def rewrite_plus_overrides(argv: list[str], groups: set[str]) -> list[str]:
    out = []
    for arg in argv:
        if arg.startswith("+") and not arg.startswith("++") and "=" in arg and arg[1:].split("=", 1)[0] in groups:
            arg = arg[1:]
        out.append(arg)
    return out


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig

    run = hydra.utils.get_method(cfg.experiment._target_)
    return run(cfg, Path(HydraConfig.get().runtime.output_dir))


def main() -> None:
    sys.argv = [sys.argv[0], *rewrite_plus_overrides(sys.argv[1:], groups_with_default())]
    hydra_main()


if __name__ == "__main__":
    main()
