# fl-ser: `make run` (the main job) and `make test` set up .venv on first use.
# Pass Hydra overrides with ARGS="...", pytest options with PYTEST_ARGS="...", test workers with TEST_WORKERS=N.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fl-ser-installed
ARGS ?=
PYTEST_ARGS ?=
OUT ?= outputs/bench

.PHONY: run test bench soak frontier audit web lint clean-venv

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "fl-ser: installing into $(VENV) (first time: several minutes, torch is ~5 GB)"
	$(PY) -m pip install --disable-pip-version-check -q -e ".[dev]"
	@touch $@

run: $(STAMP)
	$(PY) -m experiments.train $(ARGS)

# Two workers (pytest-xdist), each running whole test modules (module fixtures stay shared; the lab's processes and
# ports stay in one worker): 12.5 min here against 21 min serially. TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile) $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m experiments.bench --out $(OUT)

# The load soak (hours: 1,000 devices, 50 per round, 200 rounds, full privacy stack); not part of `make test`.
soak: $(STAMP)
	$(PY) -m experiments.soak --out outputs/soak

# The privacy-utility frontier (a speaker k-fold crossval per privacy mode and target epsilon; hours at the
# defaults). Resume a stopped sweep with the same ARGS plus hydra.run.dir=ITS_DIR.
frontier: $(STAMP)
	$(PY) -m experiments.frontier $(ARGS)

# The privacy and robustness audit of an experiment (ARGS: its overrides; add --quick for a smoke test).
audit: $(STAMP)
	$(PY) -m experiments.audit $(ARGS)

# The browser page, web/dist (not committed: 15 MB, most of it onnxruntime-web's WASM): build it once, and again after
# editing web/ (Node 20, npm; packages from the npm registry, pinned by package-lock.json).
# Serve a release with it: python -m clients.web --release RUN_DIR/release
web:
	cd web && npm ci --no-audit --no-fund && npm run build

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean-venv:
	rm -rf $(VENV)
