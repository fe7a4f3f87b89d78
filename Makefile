# The front door: `make run`, `make test`, `make lint`, `make docker`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 3000
FORGE_PORT ?= 3002

.PHONY: venv run serve test lint format typecheck pytest docker clean docs

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/runnerkit up app:app --runner-port $(PORT) --forge-port $(FORGE_PORT)

serve: $(STAMP)
	PORT=$(PORT) $(BIN)/gunicorn -c deploy/gunicorn.conf.py app:app

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy runnerkit app.py
	$(BIN)/hadolint deploy/Dockerfile

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The dashboard's browser test drives Debian's Chromium (never a downloaded browser): installed
# here when missing and this is root on a Debian-like system, else the test says what to do.
pytest: $(STAMP)
	@command -v chromium >/dev/null 2>&1 || [ -n "$$CHROMIUM_PATH" ] \
		|| { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& echo "installing Debian's chromium for the dashboard's browser test" \
		&& apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
		|| echo "make: chromium is not installed; the dashboard's browser test will fail"
	$(BIN)/pytest $(PYTEST_ARGS)

test: lint pytest

docs: $(STAMP)
	$(BIN)/python -c "from runnerkit.cli.settings_doc import write_settings_doc as w; w('docs/configuration.md')"

docker:
	docker build -f deploy/Dockerfile -t runnerkit-example .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache

# Benchmarks (bench/, never part of `make test`): prints the table and writes
# bench/results/latest.{md,json,png}. `make bench BENCH_QUICK=1` is a short smoke run.
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP) setup.cfg pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

.PHONY: bench
bench: $(BENCH_STAMP)
	@command -v wrk >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq wrk >/dev/null 2>&1; } \
		|| echo "bench: wrk is not installed; part 1 uses the Python load generator"
	$(BIN)/python -m bench $(if $(filter-out 0,$(BENCH_QUICK)),--quick,) $(BENCH_ARGS)

# Fault-injection suite (tests/faults), scenarios marked faults_long included (`make test`
# runs the rest). Prints one summary line per scenario.
.PHONY: faults
faults: $(STAMP)
	RUNNERKIT_FAULTS_LONG=1 $(BIN)/pytest tests/faults $(PYTEST_ARGS)
