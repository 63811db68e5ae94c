# pose_estimator developer entry points. The README's two commands:
#   make demo    set up (first time only) and run the demo
#   make test    set up (first time only) and run the whole test suite
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTEST_ARGS ?=

.PHONY: help setup build demo test clean distclean

help:
	@echo "make setup     create .venv, install requirements, build messages (idempotent)"
	@echo "make build     re-run the colcon build (messages, install tree)"
	@echo "make demo      run 'pose-estimator demo'"
	@echo "make test      run the pytest suite (PYTEST_ARGS=... to pass options)"
	@echo "make clean     remove build/ install/ log/ and caches (keeps .venv)"
	@echo "make distclean clean, and remove .venv"

setup:
	@bash scripts/setup_env.sh

build:
	@bash scripts/setup_env.sh --build

demo: setup
	@bash -c 'source ./activate.sh && exec .venv/bin/pose-estimator demo'

test: setup
	@bash -c 'source ./activate.sh && exec python -m pytest -q $(PYTEST_ARGS) test'

clean:
	rm -rf build install log .pytest_cache *.egg-info
	find . -path ./.venv -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf .venv
