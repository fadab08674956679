# cltvit: the README's commands. Every target installs what it needs on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
ARTIFACTS ?= artifacts
BUNDLE ?= $(ARTIFACTS)/reference/bundle
PORT ?= 3000
# loopback only by default; HOST=0.0.0.0 serves every interface (set CLTVIT_API_TOKEN then)
HOST ?= 127.0.0.1

.PHONY: setup data wrk prometheus test test-slow serve monitor reference-bundle reference bench bench-serve load soak clean

setup: $(VENV)/.installed data

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,ray,eval]'
	touch $@

# Debian packages the project reads, installed when missing and run as root: Fashion-MNIST (the reference model's
# data), WordNet (the feature atlas's default vocabulary), Chromium (the viewer's browser tests, driven by Playwright).
DEBIAN := $(FMNIST):dataset-fashion-mnist /usr/share/wordnet/cntlist.rev:wordnet-base /usr/bin/chromium:chromium
data:
	@missing=""; for pair in $(DEBIAN); do [ -e "$${pair%%:*}" ] || missing="$$missing $${pair##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then (apt-get install -y $$missing || (apt-get update && apt-get install -y $$missing)); \
	  else echo "missing Debian packages:$$missing; run 'sudo apt-get install -y$$missing'" >&2; exit 1; fi; \
	fi

# wrk, the load generator of bench-serve (Debian package; installed when missing and run as root).
wrk:
	@if ! command -v wrk >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then (apt-get install -y wrk || (apt-get update && apt-get install -y wrk)); \
	  else echo "wrk missing: run 'sudo apt-get install -y wrk'" >&2; exit 1; fi; \
	fi

# Prometheus, promtool, amtool and node_exporter (Debian's prometheus, prometheus-alertmanager and
# prometheus-node-exporter; installed when missing and run as root): `make monitor` runs Prometheus, the tests run
# promtool/amtool on the kit, and a real Prometheus and node_exporter (slow).
prometheus:
	@missing=""; for pair in /usr/bin/prometheus:prometheus /usr/bin/amtool:prometheus-alertmanager \
	    /usr/bin/prometheus-node-exporter:prometheus-node-exporter; do \
	  [ -e "$${pair%%:*}" ] || missing="$$missing $${pair##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then (apt-get install -y $$missing || (apt-get update && apt-get install -y $$missing)); \
	  else echo "missing Debian packages:$$missing; run 'sudo apt-get install -y$$missing'" >&2; exit 1; fi; \
	fi

# The suite without the `slow` tests (ViT-B-32/B-16 parity, the shipped weights' full report, the label-churn
# load test, the browser and multi-process end-to-end tests: docs/testing.md), and those alone; CI (.ci/run) runs both.
test: setup prometheus
	$(PY) -m pytest -q -m "not slow"

test-slow: setup prometheus
	$(PY) -m pytest -q -m slow

# The main command: on first run (when BUNDLE is the default) export the reference bundle from the
# weights shipped in pipeline/reference_weights/ (seconds), then serve it on $(HOST):$(PORT).
# Any bundle: make serve BUNDLE=path/to/bundle. Auth: CLTVIT_API_TOKEN=... make serve
serve: setup reference-bundle
	$(VENV)/bin/cltvit-serve --bundle $(BUNDLE) --host $(HOST) --port $(PORT)

# The service with drift monitoring and a Prometheus with the monitoring kit (monitoring/), both on loopback:
# prints their URLs, Ctrl-C stops both. The drift reference is made on first use from Fashion-MNIST training
# images ($(ARTIFACTS)/monitor/reference.json); `$(PY) scripts/monitor.py traffic [--invert]` sends images.
PROMETHEUS_PORT ?= 9090
monitor: setup prometheus reference-bundle
	$(PY) scripts/monitor.py run --bundle $(BUNDLE) --port $(PORT) --prometheus-port $(PROMETHEUS_PORT) --work $(ARTIFACTS)/monitor

reference-bundle:
	@if [ ! -f $(BUNDLE)/bundle.json ]; then \
	  if [ "$(BUNDLE)" = "$(ARTIFACTS)/reference/bundle" ]; then $(VENV)/bin/cltvit-reference export --out $(BUNDLE) --overwrite; \
	  else echo "no bundle at $(BUNDLE) (bundle.json missing)" >&2; exit 2; fi; \
	fi

# Retrain the reference model from scratch (about 18 minutes on 2 cores): CLIP, CLT, CLT-vs-PLT
# comparison, evaluation report, bundle, all in $(ARTIFACTS)/reference-build. To make those weights
# the shipped ones: $(VENV)/bin/cltvit-reference ship --build $(ARTIFACTS)/reference-build
reference: setup
	$(VENV)/bin/cltvit-reference build --out $(ARTIFACTS)/reference-build

# Load test: serve LOAD_BUNDLE on 127.0.0.1, Locust headless (LOAD_USERS users, LOAD_SECONDS s), CSV in
# $(ARTIFACTS)/load; fails on any failed request or p95 > LOAD_P95_MS; prints service/raw images/s.
# ViT-B-32 target: make load LOAD_BUNDLE=$(ARTIFACTS)/bench/vitb32-bundle LOAD_MIN_RATIO=0.8
LOAD_BUNDLE ?= $(BUNDLE)
LOAD_USERS ?= 16
LOAD_SECONDS ?= 60
LOAD_P95_MS ?= 10000
LOAD_MIN_RATIO ?=
LOAD_ENDPOINT ?= classify
load: setup
	@if [ "$(LOAD_BUNDLE)" = "$(BUNDLE)" ]; then $(MAKE) --no-print-directory reference-bundle; fi
	$(PY) scripts/load/run_load.py --bundle $(LOAD_BUNDLE) --users $(LOAD_USERS) --duration $(LOAD_SECONDS) \
	  --endpoint $(LOAD_ENDPOINT) --max-batch-size $(LOAD_USERS) --p95-ms $(LOAD_P95_MS) \
	  $(if $(LOAD_MIN_RATIO),--min-ratio $(LOAD_MIN_RATIO)) --out $(ARTIFACTS)/load

# Benchmarks: each script prints the ratios it measured in one run (README "Benchmarks").
# bench_export.py keeps the ViT-B-32 bundle in $(ARTIFACTS)/bench/vitb32-bundle for `make load`.
bench: setup wrk
	$(PY) scripts/bench_training.py --json $(ARTIFACTS)/bench/bench_training.json
	$(PY) scripts/bench_export.py --out $(ARTIFACTS)/bench
	$(PY) scripts/bench_score.py --bundle $(ARTIFACTS)/bench/vitb32-bundle --out $(ARTIFACTS)/bench/bench_score.json
	$(PY) scripts/bench_spatial.py --work $(ARTIFACTS)/bench --json $(ARTIFACTS)/bench/bench_spatial.json --http
	$(PY) scripts/bench_intervene.py --work $(ARTIFACTS)/bench --models reference,ViT-B-32 --rounds 10 --http

# Serving benchmark (docs/serving.md): BentoML's floor, the service at 1/16/64 clients and the
# in-process ceiling in one run; prints the issue's targets as ratios. ViT-B-32 architecture:
# make bench-serve BENCH_SERVE_BUNDLE=$(ARTIFACTS)/bench/vitb32-bundle (made by make bench).
BENCH_SERVE_BUNDLE ?= $(BUNDLE)
BENCH_SERVE_SECONDS ?= 10
BENCH_SERVE_THREADS ?= 1
bench-serve: setup wrk
	@if [ "$(BENCH_SERVE_BUNDLE)" = "$(BUNDLE)" ]; then $(MAKE) --no-print-directory reference-bundle; fi
	$(PY) scripts/bench_serve.py --bundle $(BENCH_SERVE_BUNDLE) --seconds $(BENCH_SERVE_SECONDS) \
	  --threads $(BENCH_SERVE_THREADS) --work $(ARTIFACTS)/bench/serve

# Soak (docs/serving.md "Long runs"): one server under mixed traffic for SOAK_MINUTES (4 /explain, 2 /classify
# with label churn, bad requests, a /livez poller), figures per window and the verdict against the targets.
SOAK_BUNDLE ?= $(BUNDLE)
SOAK_MINUTES ?= 30
SOAK_WORKERS ?= 1
soak: setup
	@if [ "$(SOAK_BUNDLE)" = "$(BUNDLE)" ]; then $(MAKE) --no-print-directory reference-bundle; fi
	$(PY) scripts/soak.py --bundle $(SOAK_BUNDLE) --minutes $(SOAK_MINUTES) --workers $(SOAK_WORKERS) \
	  --out $(ARTIFACTS)/soak/w$(SOAK_WORKERS)

clean:
	rm -rf $(ARTIFACTS) .pytest_cache
