# The two commands of the README:
#   make demo   set up (first time only), then train -> export -> serve on cartpole-swingup (qsm-demo)
#   make test   set up (first time only), then run the test suite
# Set-up is a project-local virtual environment in .venv; it is redone when pyproject.toml or
# constraints.txt change. TORCH may name another build, e.g. TORCH="torch==2.13.0" (default).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: an unpinned torch would pull several GB of CUDA packages.
	$(BIN)/python -m pip install --quiet -c constraints.txt "$(TORCH)"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[all]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/qsm-demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m benchmarks.update_throughput
	$(BIN)/python -m benchmarks.learning --preset fast --seeds 0

clean:
	rm -rf $(VENV) build *.egg-info
