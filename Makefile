# The two set-up commands of the README. Each creates the virtual environment when it is missing,
# installs the pinned CPU torch first (so pip never resolves the CUDA build), then this package.
#   make demo   set up and train the embedded demo (extra overrides: make demo ARGS="train.max_steps=40")
#               (make demo-curriculum: the same with the three-phase difficulty curriculum)
#   make test   set up and run the test suite      (extra pytest flags: make test PYTEST_ARGS="-x -k demo")
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
# The stamp names the torch requirement, so a different TORCH=... re-runs the installation.
STAMP := $(VENV)/.sftdist-installed-$(shell printf '%s' '$(TORCH)' | cksum | cut -d' ' -f1)

.PHONY: setup demo demo-curriculum test clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/sftdist-train $(ARGS)

# The demo with the three-phase difficulty curriculum (its own output_dir, so it never resumes the plain demo).
demo-curriculum: $(STAMP)
	$(BIN)/sftdist-train curriculum=three_phase output_dir=outputs/sft-curriculum $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs build *.egg-info
