VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test demo bench clean

setup: $(VENV)/.installed

# setup.py and csrc/ too: the native CPU backend is compiled by the package build.
$(VENV)/.installed: pyproject.toml setup.py scripts/setup_env.sh $(wildcard csrc/*.cpp csrc/*.h)
	bash scripts/setup_env.sh $(VENV)

# The whole test suite: kernels in the Triton interpreter, ahead-of-time sm_90 compiles, the
# trainer on the embedded model. GPU tests run where a GPU is present.
test: setup
	$(PY) -m pytest -q tests
	@echo "The rlsc command is in $(VENV)/bin: run $(VENV)/bin/rlsc --help, or 'source $(VENV)/bin/activate' first."

# The main job: eval before, RLSC training, eval after, on the embedded model, on CPU.
demo: setup
	$(PY) -m rlsc demo --output-dir runs/demo
	@echo "The rlsc command is in $(VENV)/bin: run $(VENV)/bin/rlsc --help, or 'source $(VENV)/bin/activate' first."

bench: setup
	$(PY) -m pytest -q benchmarks --benchmark-only

clean:
	rm -rf $(VENV) runs .pytest_cache .benchmarks
