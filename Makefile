# Everyday commands. Each one builds .venv first if it is missing or pyproject.toml changed.
# The daemon's settings come from the environment or `.env` (see .env.example), read by the
# programs themselves, so none of these targets passes configuration on.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Touched after a successful install: the venv is rebuilt only when pyproject.toml is newer.
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help venv demo test lint migrate worker beat flower emulator bench clean

help:
	@echo "make demo      run the whole daemon against the eSMS emulator on this machine"
	@echo "make test      run the test suite (Postgres/Redis at TEST_PG_ADMIN_URL/TEST_REDIS_URL, else embedded)"
	@echo "make lint      ruff check"
	@echo "make migrate   alembic upgrade head on DATABASE_URL"
	@echo "make worker | beat | flower | emulator   run one component in the foreground"
	@echo "make bench     throughput benchmark (bench/throughput.py)"
	@echo "make clean     remove demo leftovers and caches (keeps .venv)"

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
		echo "Python 3.11 or newer is needed; '$(PYTHON)' is: $$($(PYTHON) -V 2>&1)."; \
		echo "Install one (Debian/Ubuntu: sudo apt-get install python3.11 python3.11-venv)"; \
		echo "and run: make PYTHON=python3.11 $(MAKECMDGOALS)"; \
		exit 1; }
	@# Without python3-venv, `python3 -m venv` leaves a venv that has no pip: check for pip.
	@$(BIN)/python -m pip --version >/dev/null 2>&1 || { \
		rm -rf $(VENV); \
		$(PYTHON) -m venv $(VENV) && $(BIN)/python -m pip --version >/dev/null 2>&1; \
	} || { \
		rm -rf $(VENV); \
		echo "'$(PYTHON) -m venv' failed. Install venv support (Debian/Ubuntu):"; \
		echo "    sudo apt-get install python3-venv"; \
		exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: venv
	$(BIN)/python -m worker.demo

test: venv
	$(BIN)/pytest -q

lint: venv
	$(BIN)/ruff check

migrate: venv
	$(BIN)/alembic upgrade head

worker: venv
	$(BIN)/celery -A worker worker --loglevel=INFO

beat: venv
	$(BIN)/celery -A worker beat --loglevel=INFO

# Flower reads FLOWER_BASIC_AUTH (user:password) from its environment; taken from .env when the
# shell does not set it. Without it Flower is open, so it then listens on loopback only.
flower: venv
	@auth="$${FLOWER_BASIC_AUTH:-$$(sed -n 's/^FLOWER_BASIC_AUTH=//p' .env 2>/dev/null | tail -n 1)}"; \
	if [ -n "$$auth" ]; then export FLOWER_BASIC_AUTH="$$auth"; address=0.0.0.0; \
	else unset FLOWER_BASIC_AUTH; address=127.0.0.1; \
		echo "FLOWER_BASIC_AUTH is not set: Flower without a password, on 127.0.0.1 only"; fi; \
	exec $(BIN)/celery -A worker flower --port=5555 --address=$$address

# Point the daemon at it with ESMS_BASE_URL=http://127.0.0.1:8099, ESMS_API_KEY=demo-key,
# ESMS_SECRET_KEY=demo-secret. More knobs: make emulator EMULATOR_ARGS='--latency-max-ms 300'.
emulator: venv
	$(BIN)/python -m worker.emulator --host 127.0.0.1 --port 8099 $(EMULATOR_ARGS)

bench: venv
	$(BIN)/python bench/throughput.py

clean:
	@# A killed demo or test run can leave its embedded Postgres running; stop it before deleting
	@# its files.
	@if [ -x $(BIN)/python ] && [ -d .demo ]; then \
		$(BIN)/python -c 'from worker.localservices import stop_leftover_postgres as s; s()'; fi
	rm -rf .demo .pytest_cache .ruff_cache .hypothesis build celerybeat-schedule*
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
