# Quick start targets. Each creates .venv with python3, installs genbench into
# it, then runs something: `make run` is the main job, `make test` is what CI
# runs (.ci/run).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is pinned to one release so that a machine with a local wheel of it
# (as our CI has) installs nothing large; `make run TORCH_SPEC=torch` takes the
# newest instead.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install run test cli-timing clean

$(BIN)/genbench: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q '$(TORCH_SPEC)'
	$(BIN)/python -m pip install -q -e '.[test,triton,hf,gpu,gan]'
	touch $@

install: $(BIN)/genbench

run: install
	$(BIN)/genbench attention

# -n auto: one pytest worker per core (pytest-xdist); most tests are
# single-threaded Python (Triton's interpreter, the CLI in subprocesses).
test: install
	$(BIN)/python -m pytest -q -n auto

# How long `genbench --help` and `genbench compare` take to answer, against their targets.
cli-timing: install
	$(BIN)/python tools/cli_timing.py

clean:
	rm -rf $(VENV) build *.egg-info
