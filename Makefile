# pie: `make demo` runs the main job end to end offline; `make test` lints and runs the tests.
# Both install what they need into .venv first (idempotent: quick when nothing changed).

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   := .cache/demo

.PHONY: install test lint demo demo-model finetune simulate bench clean

# make finetune RECIPE=recipes/chexpert-lora.yaml DATA=/data/CheXpert-v1.0  (re-run to resume)
# make simulate RECIPE=recipes/chexpert-lora.yaml IMAGE=cxr.png MASK=lung.png PROMPT="large left pleural effusion"
RECIPE ?= recipes/chexpert-lora.yaml
NAME   := $(basename $(notdir $(RECIPE)))
FT_OUT ?= runs/finetune/$(NAME)

install: $(STAMP)

$(STAMP): requirements/dev.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements/dev.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check pie_cli tests benchmarks recipes
	$(BIN)/ruff format --check pie_cli tests benchmarks recipes

test: lint
	$(BIN)/python -m pytest

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

clean:
	rm -rf $(VENV) .cache runs .pytest_cache .ruff_cache *.egg-info
