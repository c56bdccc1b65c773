# Two commands do all the set-up:  `make run`  and  `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test test-fast test-all bench bench-serving bench-reliability clean

setup: $(STAMP)

# torch first: the pinned CPU build is on local disk here; installing it before
# anything that depends on torch stops pip from resolving a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# DeepSpeed JIT-builds its CPU shared-memory comm op on first use (~1 min): do it once here.
	DS_ACCELERATOR=cpu $(BIN)/python -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()"
	touch $(STAMP)

# The main job end to end on the embedded synthetic data (offline, CPU only): train, evaluate,
# promote, serve on http://127.0.0.1:8000, show the feedback loop once (simulated clicks ->
# retrain -> swap), then keep serving until Ctrl-C (ARGS="serve.enabled=false" stops after promotion).
run: $(STAMP)
	RAY_AUTH_MODE=disabled $(BIN)/python -m jobs.pipeline serve.enabled=true serve.demo_feedback=true $(ARGS)

# The default suite (what CI runs): unit, integration and e2e; `make test-fast` runs the unit part.
test: $(STAMP)
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -m "not slow and not gpu" $(ARGS)

# The fast part: tests/unit only (components, configs, manifests; no Ray, no network), in seconds
# to a couple of minutes. tests/integration and tests/e2e carry the markers `integration` and `e2e`.
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests/unit -m "not slow and not gpu" $(ARGS)

test-all: $(STAMP)
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -m "not gpu" $(ARGS)

bench: $(STAMP)
	RAY_AUTH_MODE=disabled $(BIN)/python -m benchmarks.preprocess_throughput $(ARGS)

bench-serving: $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	RAY_AUTH_MODE=disabled $(BIN)/python -m benchmarks.serving $(ARGS)

bench-reliability: $(STAMP)
	RAY_AUTH_MODE=disabled $(BIN)/python -m benchmarks.reliability $(ARGS)

clean:
	rm -rf storage .pytest_cache
