# Two commands set up everything: `make demo` and `make test`.
# Both create .venv with python3 if it is missing and install the package.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test demo notebooks bench-cost bench-long bench-train clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

# The docstring examples run in their own pytest process, before the suite:
# some test modules enable float64 globally, which the examples must not see.
test: $(STAMP)
	$(BIN)/python -m pytest -q --doctest-modules llqr_optax
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python benchmarks/demo.py

# Executes every notebook, with its outputs, into notebooks/out/ (git-ignored).
notebooks: $(STAMP)
	$(BIN)/python notebooks/run.py

# Cost of llqr over adam (memory, compile, per-step overhead, refit scaling),
# and 10,000-step runs at two learning rates: JSON + PNG in benchmarks/out/.
bench-cost: $(STAMP)
	$(BIN)/python benchmarks/cost.py --candidates

bench-long: $(STAMP)
	$(BIN)/python benchmarks/long_run.py

# Training benchmark in the main env: three tasks (MNIST-1D MLP and ResNet,
# char Transformer LM), optax's optimizers and llqr variants, learning-rate
# grid on seed 0 then seeds 0-2; ~30-40 min on a 2-core CPU. Then RESULTS.md.
bench-train: $(STAMP)
	$(BIN)/python benchmarks/training.py
	$(BIN)/python benchmarks/results.py

clean:
	rm -rf $(VENV) build *.egg-info
