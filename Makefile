# luspo-megatron. From a fresh clone: `make demo` (the embedded default main job), `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed
# Sources that change what gets installed or compiled into the venv.
INSTALL_INPUTS := setup.py pyproject.toml $(wildcard requirements/*.txt) $(wildcard csrc/*)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
PYTEST := $(PY) -m pytest

.PHONY: venv bench-deps demo test test-all bench lint clean

venv: $(STAMP)

# torch first, alone: on these machines torch==2.13.0 is the local CPU wheel; installed later as a
# dependency of something else it could resolve to a multi-GB CUDA build.
$(STAMP): $(INSTALL_INPUTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -r requirements/torch.txt
	$(PIP) install -c requirements/constraints.txt -r requirements/build.txt -r requirements/runtime.txt -r requirements/test.txt
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@

# TRL for benchmarks/vs_trl.py (not needed to train or test); installs offline from the pinned wheels.
bench-deps: venv
	$(PIP) install -c requirements/constraints.txt -r requirements/bench.txt

demo: venv
	$(PY) tools/train_luspo.py

test: venv
	$(PYTEST) -m "not slow" tests

# The slow tests, and the TRL loss check (tests/benchmarks), which needs the bench extra.
test-all: bench-deps
	$(PYTEST) tests

# The quick versions of every benchmark (about 15 minutes on 2 cores); each rewrites its table in docs/bench/.
bench: bench-deps
	@for script in benchmarks/bench_*.py benchmarks/vs_trl.py benchmarks/length_dynamics.py; do \
		echo "== $$script"; OMP_NUM_THREADS=1 $(PY) $$script --quick || exit 1; done

lint: venv
	$(PY) -m ruff check $(wildcard luspo_megatron tests tools benchmarks examples)

clean:
	rm -rf $(VENV) build *.egg-info luspo_megatron/_C*.so
