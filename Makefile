# Two commands on a fresh machine: `make demo` and `make test`. Everything else is set up on the way.
SHELL := /bin/bash
PY := .venv/bin/python
FORGE := contracts/node_modules/.bin/forge
export PYTHONUNBUFFERED := 1

.PHONY: setup build test test-contracts test-python demo devnet bench lint format clean image image-deps image-check image-lock compose

setup: .venv/.installed contracts/node_modules/.installed

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps dstack-sdk==0.5.4  # see the `dstack` extra in pyproject.toml
	touch $@

contracts/node_modules/.installed: contracts/package.json contracts/package-lock.json
	cd contracts && npm ci --no-audit --no-fund --loglevel=error
	touch $@

build: setup
	cd contracts && ./node_modules/.bin/forge build
	$(PY) contracts/export_abi.py

test: build image-deps lint test-contracts test-python

test-contracts:
	cd contracts && ./node_modules/.bin/forge test

test-python:
	$(PY) -m pytest -q

demo: build
	$(PY) -m node.demo

devnet: build
	.venv/bin/dcml-devnet --out .devnet/deployment.json

bench: build  # each prints its figure next to a baseline measured in the same run
	$(PY) bench/bench_gas.py
	$(PY) bench/bench_sla_gas.py
	$(PY) bench/bench_vouchers.py
	$(PY) bench/bench_engine.py
	$(PY) bench/bench_gateway.py
	$(PY) bench/bench_payments.py

# The CVM image, built without a container engine (image/build.py; needs root). FLAVOR=cpu | vllm.
FLAVOR ?= cpu
image-deps:  # Debian tools the image build needs (CI: a fresh machine, root, apt reachable)
	@command -v mmdebstrap >/dev/null && command -v umoci >/dev/null || \
		(apt-get update -q && apt-get install -y -q mmdebstrap umoci debian-archive-keyring)

image: setup image-deps
	$(PY) image/build.py --flavor $(FLAVOR) --archive

image-check: setup image-deps  # two builds, the second rebuilding the dependencies layer: equal digests or fail
	$(PY) image/build.py --flavor $(FLAVOR) --check

image-lock: setup  # re-resolve the hash-pinned wheel locks after changing dependencies
	$(PY) image/lock.py cpu vllm

compose: setup image-deps  # build both flavours, pin their digests in docker/app-compose.*.json, allow-list the hashes
	$(PY) image/build.py --flavor cpu --archive
	$(PY) image/build.py --flavor vllm
	$(PY) image/compose.py $(if $(VLLM_CUDA_IMAGE),--vllm-cuda-image $(VLLM_CUDA_IMAGE))

lint:
	.venv/bin/ruff check .

format: setup
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

clean:
	rm -rf .venv contracts/node_modules contracts/out contracts/cache .devnet .pytest_cache build/image
