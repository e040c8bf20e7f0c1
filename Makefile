# `make train` and `make test` work on a fresh machine: they install what is missing first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .install.stamp

.PHONY: install train test lint bench clean

install: $(STAMP)

# torch first, pinned to the CPU wheel that lies on disk here: letting pip resolve `torch`
# from the index would pull a multi-GB CUDA build. An installed torch in range is kept.
$(STAMP): setup.cfg pyproject.toml
	@$(PYTHON) -c "import torch, sys; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(not (2, 6) <= v < (2, 15))" 2>/dev/null \
		|| $(PIP) install torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	@touch $(STAMP)

train: install
	$(PYTHON) -m launch.cli train configs/default.yaml

# Two workers, each file on one (its module fixtures built once): most tests wait on
# subprocesses (imports, rendezvous, keepers) and leave a core idle, so two workers finish the
# suite in about half the time on a 2-core machine. `make test PYTEST_WORKERS=0` runs it serially.
PYTEST_WORKERS ?= 2
test: install lint
	$(PYTHON) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --durations=25 tests

lint: install
	$(PYTHON) -m ruff check .

bench: install
	$(PYTHON) scripts/bench.py --quick

clean:
	rm -rf $(STAMP) runs *.egg-info .pytest_cache .ruff_cache
