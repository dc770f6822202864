# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RUNS   ?= runs/digits

.PHONY: setup demo test lint clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned so pip takes the CPU wheel instead of a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[all,dev]"
	touch $@

setup: $(VENV)/.installed

# Records a training run through cvcore.Recorder (entropy and trace with the kernel's
# alignment to the labels and its motion), reports it and draws its figure.
demo: setup
	$(BIN)/python examples/digits_demo.py --out $(RUNS) --epochs 20
	$(BIN)/cv report $(RUNS)/run.db
	$(BIN)/cv plot $(RUNS)/run.db --out $(RUNS)/cv.png --force

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check cvcore backends cli adapters tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache
