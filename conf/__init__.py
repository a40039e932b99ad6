"""The Hydra configs (config.yaml and one folder per config group), shipped as package data.

Importable as `lmcache_lab.conf` (pyproject maps this folder), so `lmcache_lab.run` finds them
through the package: in a checkout (editable install) and in an installed wheel alike.
"""
