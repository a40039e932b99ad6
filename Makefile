# The two commands of the README:  `make run`  and  `make test`. Both do the whole set-up first.
# `make lint`: ruff and the layer contract alone.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run test lint
setup:
	bash scripts/setup.sh

run: setup
	$(PY) -m lmcache_lab.run +policy=lfu $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS); rc=$$?; [ $$rc -eq 5 ] && { echo "pytest collected no tests"; exit 1; }; exit $$rc

lint: setup
	$(PY) -m pytest -q tests/test_lint.py tests/test_layers.py
