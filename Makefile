# Two commands on a fresh Linux machine with Python 3.11:
#   make serve   set up, make the demo checkpoint if missing, serve it on ports 9000 (gRPC) and 8000 (HTTP)
#   make test    set up, run every test
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO ?= checkpoints/demo-small

.PHONY: setup serve test redis prometheus proto clean

setup: $(STAMP) redis prometheus proto

# Python modules generated from proto/elasticmoe/v1/*.proto, importable as elasticmoe.v1.
PROTOS := $(wildcard proto/elasticmoe/v1/*.proto)
proto: $(PROTOS:.proto=_pb2_grpc.py)
proto/elasticmoe/v1/%_pb2_grpc.py: proto/elasticmoe/v1/%.proto $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto $<

# The venv. Without CUDA, torch==2.13.0 first: it resolves to the CPU build, where a
# bare `torch` would pull several GB of CUDA packages. With an NVIDIA driver, pip's
# default (CUDA) torch is what we want.
$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "make: need python3.11 (or python3) on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA driver found: installing the default (CUDA) torch"; \
	else \
		echo "no CUDA: installing the CPU build torch==2.13.0"; \
		$(BIN)/python -m pip install -q torch==2.13.0; \
	fi
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

# redis-server: from the system packages when missing and we are root; else say how.
redis:
	@if ! command -v redis-server >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing redis-server from the system packages"; \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) \
				|| { echo "make: apt-get install redis-server failed"; exit 1; }; \
		else \
			echo "make: redis-server is missing. Install it (Debian/Ubuntu: sudo apt-get install redis-server;"; \
			echo "      Fedora: sudo dnf install redis; macOS: brew install redis) and run make again."; \
			exit 1; \
		fi; \
	fi

# prometheus and promtool (the tests run the alerts through promtool and scrape a real router and
# controller with a real Prometheus on loopback): the Debian package, like redis-server. The tests
# start their own server on a free port; the service the package starts on a systemd machine
# (port 9090) is stopped and disabled again, since only its binaries were wanted.
prometheus:
	@if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing prometheus (and promtool) from the system packages"; \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
				prometheus >/dev/null) || { echo "make: apt-get install prometheus failed"; exit 1; }; \
			if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then \
				systemctl disable --now prometheus >/dev/null 2>&1 || true; \
			fi; \
		else \
			echo "make: prometheus/promtool are missing. Install them (Debian/Ubuntu: sudo apt-get install prometheus;"; \
			echo "      macOS: brew install prometheus) and run make again."; \
			exit 1; \
		fi; \
	fi

$(DEMO)/config.json: | $(STAMP)
	$(BIN)/moectl make-checkpoint --family mixtral --preset small --out $(DEMO)

# The service on the demo checkpoint: 2 expert groups, gRPC on $(PORT), the OpenAI-compatible HTTP API on
# $(HTTP_PORT); Ctrl-C stops it. From a second terminal: .venv/bin/moectl generate --address 127.0.0.1:$(PORT) "prompt"
PORT ?= 9000
HTTP_PORT ?= 8000
GROUPS ?= 2
serve: setup $(DEMO)/config.json
	$(BIN)/moectl serve --checkpoint $(DEMO) --groups $(GROUPS) --port $(PORT) --http-port $(HTTP_PORT)

test: setup
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) checkpoints .pytest_cache
