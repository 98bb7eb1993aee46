# deskgen — the two commands a newcomer needs: `make serve` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODELS ?= models/tiny
# A machine without an NVIDIA GPU declares logical GPUs so the production graph (captioner 0.25 GPU,
# generator 1 GPU) schedules unchanged; the models then run on the CPU.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
LOGICAL_GPUS ?= 2
METRICS_PORT ?= 8080
# The graph asks for 4.25 CPUs (Ingress 0.5, Classifier/Captioner/Generator 1, Locator/Recorder/JobConsumer
# 0.25): a smaller machine declares 5 logical CPUs so it schedules (replicas then share the cores). `cpu_node` marks this node as one
# that may run the CPU deployments (serve_config.yaml pins them to it).
LOGICAL_CPUS ?= $(shell n=$$(nproc); [ $$n -lt 5 ] && n=5; echo $$n)
RAY_ENV := RAY_OVERRIDE_RESOURCES='{"CPU":$(LOGICAL_CPUS),$(if $(HAS_GPU),,"GPU":$(LOGICAL_GPUS),)"cpu_node":1000}'

.PHONY: install models serve test system-deps test-unit test-serve test-cluster test-postgres test-observability test-browser lint bench-cpu bench-overload bench-locator bench-bandit bench-router bench-router-sim bench-jobs bench-gpu test-gpu cluster-up cluster-down clean

install: $(VENV)/.installed

# torch first: on a CPU machine the local CPU wheel (torch==2.13.0); elsewhere the CUDA build.
# The client distribution (client/: httpx and pydantic) before the server, which depends on it.
$(VENV)/.installed: pyproject.toml client/pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e './client[test]'
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

models: install $(MODELS)/.complete

$(MODELS)/.complete: $(wildcard deskgen/tools/tiny*.py)
	DESKGEN_MODELS=$(MODELS) $(BIN)/python -m deskgen.tools.tiny --out $(MODELS)

# A local Ray head with Ray's Prometheus endpoint on a fixed port (METRICS_PORT, = METRICS_EXPORT_PORT in
# deployments/metrics.py and observability/prometheus.yml), then the app on it; Ctrl-C stops both.
# Redis (the jobs' broker and store, args.jobs.redis_url) on 127.0.0.1:$(REDIS_PORT), its append-only file
# under build/redis, stopped with the app.
REDIS_PORT ?= 6380
serve: models system-deps
	$(BIN)/python -m deskgen.tools.redis start --dir build/redis --port $(REDIS_PORT) >/dev/null && \
	$(RAY_ENV) $(BIN)/ray start --head --metrics-export-port=$(METRICS_PORT) --dashboard-host=127.0.0.1 \
	  --disable-usage-stats >/dev/null && \
	trap '$(BIN)/ray stop >/dev/null 2>&1; $(BIN)/python -m deskgen.tools.redis stop --dir build/redis' EXIT INT TERM && \
	RAY_ADDRESS=auto $(BIN)/serve run serve_config.yaml

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

test-unit: models
	$(BIN)/python -m pytest -m unit -q

test-serve: models
	$(BIN)/python -m pytest -m serve -q

test-cluster: models
	$(BIN)/python -m pytest -m cluster -q

test-postgres: models
	$(BIN)/python -m pytest -m postgres -q

test-observability: models
	$(BIN)/python -m pytest -m observability -q

# The gpu-marked tests (skipped without CUDA): run on a machine with an NVIDIA GPU (bench/gpu_device.sh
# runs the same selection on a lent one). DESKGEN_COMPILE_TESTS=1 runs them on the CPU (minutes).
GPU_TESTS = tests/unit/test_generator_speed.py
test-gpu: models
	$(BIN)/python -m pytest -m gpu -q -rs $(GPU_TESTS)

# The web page in a real headless Chromium (part of the serve tier: `make test` runs it too).
test-browser: models system-deps
	$(BIN)/python -m pytest -m browser -q

# System packages the test tiers start as real servers (Debian): PostgreSQL 15's server binaries for the
# `postgres` tier, Prometheus for the `observability` tier, Chromium and its driver for the `browser` tests,
# Redis for the jobs' broker (deskgen/tools/redis.py). Installed only where missing; sudo when not root.
# `make test` (and so .ci/run) runs this first.
system-deps:
	@if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1 || \
	    ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1 || \
	    ! command -v redis-server >/dev/null 2>&1; then \
	  sudo=""; if [ "$$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then sudo=sudo; fi; \
	  echo "installing postgresql prometheus chromium chromium-driver redis-server (apt-get)" >&2; \
	  $$sudo apt-get update -qq && \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql prometheus \
	    chromium chromium-driver redis-server; \
	fi

test: lint models system-deps
	$(BIN)/python -m pytest -m "unit or serve or cluster or postgres or observability" -q --durations=15

bench-cpu: models
	$(RAY_ENV) $(BIN)/python -m bench.cpu

bench-overload: models
	$(BIN)/python -m bench.overload

bench-locator: models
	$(BIN)/python -m bench.locator

bench-router: models
	$(BIN)/python -m bench.router

bench-router-sim: install
	$(BIN)/python -m bench.router_sim

bench-jobs: models system-deps
	$(BIN)/python -m bench.jobs

bench-bandit: install
	$(BIN)/python -m bench.bandit

bench-gpu: install
	$(BIN)/python -m bench.gpu

cluster-up: models
	cluster/local.sh start

cluster-down:
	cluster/local.sh stop

clean:
	rm -rf $(MODELS) .pytest_cache .mypy_cache .ruff_cache
