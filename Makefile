# pie: `make demo` runs the main job end to end offline; `make test` lints and runs the tests.
# Both install what they need into .venv first (idempotent: quick when nothing changed).

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   := .cache/demo

.PHONY: install test test-min lint demo demo-model finetune simulate bench bench-smoke gpu-wheels clean

# make finetune RECIPE=recipes/chexpert-lora.yaml DATA=/data/CheXpert-v1.0  (re-run to resume)
# make simulate RECIPE=recipes/chexpert-lora.yaml IMAGE=cxr.png MASK=lung.png PROMPT="large left pleural effusion"
RECIPE ?= recipes/chexpert-lora.yaml
NAME   := $(basename $(notdir $(RECIPE)))
FT_OUT ?= runs/finetune/$(NAME)

install: $(STAMP)

$(STAMP): requirements/dev.txt requirements/dev-nodeps.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements/dev.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements/dev-nodeps.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check pie_cli tests benchmarks recipes
	$(BIN)/ruff format --check pie_cli tests benchmarks recipes

test: lint
	$(BIN)/python -m pytest

# The fast tests against the oldest versions pyproject.toml declares (torch stays the pinned CPU build):
# proves the lower bounds are true. Its own venv, rebuilt when pyproject.toml changes.
MIN_VENV := .venv-min
test-min: $(MIN_VENV)/.installed-stamp
	$(MIN_VENV)/bin/python -m pytest -q -m "not slow" -p no:cacheprovider

$(MIN_VENV)/.installed-stamp: pyproject.toml requirements/dev.txt requirements/dev-nodeps.txt requirements/lowest.py
	@test -x $(MIN_VENV)/bin/python || $(PYTHON) -m venv $(MIN_VENV)
	$(PYTHON) requirements/lowest.py > $(MIN_VENV)/lowest.txt
	$(MIN_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r $(MIN_VENV)/lowest.txt
	$(MIN_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements/dev-nodeps.txt
	$(MIN_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $@

demo: $(STAMP)
	$(BIN)/pie demo case --out $(DEMO) --overwrite
	$(BIN)/pie simulate $(DEMO)/chest.png --mask $(DEMO)/left-lung.png --model demo \
		--prompt "large left pleural effusion" --steps 10 --resolution 64 --out runs/demo --overwrite \
		--pace linear --classifier demo
	$(BIN)/pie export-gif runs/demo --out runs/demo/side-by-side.gif --side-by-side --diff --mask-outline \
		--caption "step {i}/{n}" --resize 576 --overwrite
	$(BIN)/pie evaluate runs/demo --classifier demo
	@echo "GIF: runs/demo/side-by-side.gif (and progression.gif); report: runs/demo/report.html (and report.png)"

# Retrain the built-in demo model and classifier (about two hours on 2 CPU cores; see its README).
demo-model: $(STAMP)
	$(BIN)/python recipes/demo-model/train.py

finetune: $(STAMP)
	@test -n "$(DATA)" || { echo "usage: make finetune RECIPE=recipes/<name>.yaml DATA=/path/to/dataset [FT_OUT=dir]"; exit 2; }
	$(BIN)/pie finetune --config $(RECIPE) --data "$(DATA)" --out $(FT_OUT) $(if $(wildcard $(FT_OUT)/checkpoints/step_*),--resume latest,)
	$(BIN)/pie models add $(NAME) $(FT_OUT) --force
	@echo "registered as model '$(NAME)': pie simulate IMAGE --model $(NAME) ..."

simulate: $(STAMP)
	@test -n "$(IMAGE)" -a -n "$(PROMPT)" || { echo 'usage: make simulate RECIPE=recipes/<name>.yaml IMAGE=img.png [MASK=mask.png] PROMPT="..."'; exit 2; }
	$(BIN)/pie simulate "$(IMAGE)" $(if $(MASK),--mask "$(MASK)",) --prompt "$(PROMPT)" --model $(NAME) \
		--out runs/simulate/$(NAME)-$(basename $(notdir $(IMAGE))) --overwrite

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_simulate.py
	$(BIN)/python benchmarks/bench_finetune.py

# The GPU check's CPU rehearsal at tiny sizes (benchmarks/gpu/README.md; also tests/benchmarks/).
bench-smoke: $(STAMP)
	$(BIN)/python benchmarks/gpu/check.py --smoke --device cpu

# The wheels a lent GPU machine lacks, pinned to requirements/dev.txt, for its CPython 3.12 (downloads).
gpu-wheels: $(STAMP)
	$(BIN)/python benchmarks/gpu/wheels.py --out .cache/gpu-wheels

clean:
	rm -rf $(VENV) $(MIN_VENV) .cache runs .pytest_cache .ruff_cache *.egg-info
