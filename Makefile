# Two commands set up everything: `make demo` and `make test` (and `make docs`
# builds the documentation site). Each creates .venv with python3 if it is missing and install the package.
# The benchmark scripts run as modules from this folder (python -m benchmarks.X).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test demo docs notebooks bench-cost bench-long bench-peers peers-env bench-train clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

# One pytest command runs the docstring examples and the suite, on two worker
# processes (pytest-xdist), a file per worker at a time (module fixtures run
# once); `pytest -n 0` runs it in one. JAX stays in float32 there: the test
# modules that need float64 get it for their own tests only (tests/conftest.py).
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --doctest-modules llqr_optax tests

demo: $(STAMP)
	$(BIN)/python -m benchmarks.demo

# The documentation site (Sphinx + MyST-NB) into docs/_build/html, warnings as
# errors and every cross-reference resolved (-n -W). The notebooks run once
# and are cached in docs/_build/.jupyter_cache (re-run when their code
# changes); SPHINXOPTS="-D nb_execution_mode=off" skips them. The test extra
# holds the docs extra (the notebooks need flax, mnist1d, matplotlib).
SPHINXOPTS ?=
docs: $(STAMP)
	$(BIN)/python -m sphinx -b html -n -W --keep-going $(SPHINXOPTS) docs docs/_build/html
	@echo "open docs/_build/html/index.html"

# Executes every notebook, with its outputs, into notebooks/out/ (git-ignored).
notebooks: $(STAMP)
	$(BIN)/python notebooks/run.py

# Cost of llqr over adam (memory, compile, per-step overhead, refit scaling),
# and 10,000-step runs at two learning rates: JSON + PNG in benchmarks/out/.
bench-cost: $(STAMP)
	$(BIN)/python -m benchmarks.cost --candidates

bench-long: $(STAMP)
	$(BIN)/python -m benchmarks.demo.long_run

# The peer environment: K-FAC (kfac-jax 0.0.8) and PSGD Kron (psgd-jax 0.2.9)
# need an older stack (jax 0.8.2, optax 0.2.4, flax 0.10.7), pinned in
# benchmarks/peers-requirements.txt and built in .venv-peers (git-ignored);
# llqr-optax goes on top with --no-deps. Adam, llqr and the peers train in one
# process there (benchmarks/training/peers.py adapts the peers to the harness), so the
# time ratios over Adam compare like with like; then RESULTS.md is written
# from the main env. `make bench-peers QUICK=1` is a smoke test (tiny tasks,
# one rate, one seed; a minute or two, mostly compilation) whose JSON, plots
# and RESULTS.md go to benchmarks/out/peers-quick/, leaving the real ones be.
PEERS_VENV  := .venv-peers
PEERS_BIN   := $(PEERS_VENV)/bin
PEERS_STAMP := $(PEERS_VENV)/.installed
PEER_OPTIMIZERS ?= adam,kfac,psgd_kron,llqr_diag+adam
QUICK ?=
PEERS_OUT   := benchmarks/out$(if $(QUICK),/peers-quick)

$(PEERS_STAMP): benchmarks/peers-requirements.txt pyproject.toml
	test -x $(PEERS_BIN)/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_BIN)/python -m pip install -q --upgrade pip
	$(PEERS_BIN)/python -m pip install -q -r benchmarks/peers-requirements.txt
	$(PEERS_BIN)/python -m pip install -q --no-deps -e .
	$(PEERS_BIN)/python -m benchmarks.training.peers --check
	touch $(PEERS_STAMP)

peers-env: $(PEERS_STAMP)

bench-peers: $(PEERS_STAMP) $(STAMP)
	$(PEERS_BIN)/python -m benchmarks.training --tag peers --out $(PEERS_OUT) \
	  --optimizers $(PEER_OPTIMIZERS) $(if $(QUICK),--quick --lr-mults 1 --seeds 0)
	$(BIN)/python -m benchmarks.results $(if $(QUICK),--in $(PEERS_OUT) --md $(PEERS_OUT)/RESULTS.md)

# Training benchmark in the main env: three tasks (MNIST-1D MLP and ResNet,
# char Transformer LM), optax's optimizers and llqr variants, learning-rate
# grid on seed 0 then seeds 0-2; ~30-40 min on a 2-core CPU. Then RESULTS.md.
bench-train: $(STAMP)
	$(BIN)/python -m benchmarks.training
	$(BIN)/python -m benchmarks.results

clean:
	rm -rf $(VENV) $(PEERS_VENV) build *.egg-info docs/_build
