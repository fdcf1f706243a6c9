# The two commands a newcomer needs (see README):
#   make run    set up .venv and run the whole pipeline on the bundled HAM10000 sample
#   make test   set up .venv and run the test suite
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
ARGS   ?=

.PHONY: setup run test bench repro clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or make PYTHON=/path/to/python3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -qq -c requirements.lock -e '.[test]'
	@touch $@

run: setup
	$(BIN)/lesionml run $(ARGS)

test: setup
	@# The browser tests (tests/integration/test_ui.py) drive Debian's chromium: installed here
	@# when missing and this is root on a Debian-like machine; otherwise they skip.
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium for the browser tests (apt-get)"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
		|| { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; \
	fi
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest $(ARGS)

repro: setup  # the pipeline through DVC: runs only the stages whose deps or params changed
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/dvc repro $(ARGS)

bench: setup
	$(BIN)/python bench/preprocess.py $(ARGS)

clean:
	rm -rf workspace .pytest_cache
