# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv and install everything first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error

.PHONY: install test demo lint bench freeze clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU build on this machine's disk. An unpinned torch pulls GBs of CUDA wheels.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	# constraints.txt pins every dependency to the set the suite last passed with: the registry moves (a new
	# transformers once demanded a peft that did not exist yet). Refresh it with `make freeze` after an upgrade.
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

# The README's main job: train a style LoRA on the built-in tiny model, then draw base vs. the adapter at 0.5 and 1.0.
demo: install
	$(BIN)/accelerate launch train/style.py --images datasets/mozart_art --rank 4 --model tiny \
		--output demo_out/mozart_art --overwrite
	$(BIN)/python examples/style_grid.py --adapter demo_out/mozart_art/mozart_art.safetensors \
		--out demo_out/mozart_grid.png

lint: install
	$(BIN)/ruff check sd_lora train ui tests examples bench

freeze: install
	$(BIN)/python -m pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/' > constraints.txt

clean:
	rm -rf $(VENV) demo_out .pytest_cache
