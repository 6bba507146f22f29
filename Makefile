# pie: `make demo` runs the main job end to end offline; `make test` lints and runs the tests.
# Both install what they need into .venv first (idempotent: quick when nothing changed).

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   := .cache/demo

.PHONY: install test lint demo clean

install: $(STAMP)

$(STAMP): requirements/dev.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements/dev.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check pie_cli tests benchmarks
	$(BIN)/ruff format --check pie_cli tests benchmarks

test: lint
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/python -m pie_cli.demo $(DEMO)
	$(BIN)/pie simulate $(DEMO)/chest.png --mask $(DEMO)/left-lung.png --model $(DEMO)/tiny-sd \
		--prompt "large left pleural effusion" --steps 10 --resolution 256 --out runs/demo --overwrite
	$(BIN)/pie export-gif runs/demo --out runs/demo/side-by-side.gif --side-by-side --diff --mask-outline \
		--caption "step {i}/{n}" --overwrite
	@echo "GIF: runs/demo/progression.gif and runs/demo/side-by-side.gif"
	@echo "(a randomly initialised model: this shows the machinery, not medicine)"

clean:
	rm -rf $(VENV) .cache runs .pytest_cache .ruff_cache *.egg-info
