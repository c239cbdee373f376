# spinverse-fem: `make demo` and `make test` do all set-up on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
MPIEXEC := $(VENV)/bin/mpiexec
STAMP := $(VENV)/.installed-stamp
# wall-clock limits so that an MPI deadlock fails instead of hanging
SERIAL_TIMEOUT ?= 1500
MPI_TIMEOUT ?= 1500
PYTEST_FLAGS ?= -q -p no:cacheprovider

.PHONY: demo test test-serial test-mpi bench clean venv

venv: $(STAMP)

# Find a Python >= 3.12 (3.12 preferred: the suite is validated on it): $SPINVERSE_PYTHON,
# python3.12 / python3 / newer on PATH, then the oldest suitable pyenv installation.
$(PY):
	@py=""; \
	is_ok() { "$$@" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }; \
	for c in "$$SPINVERSE_PYTHON" python3.12 python3 python3.13 python3.14 python; do \
	  [ -n "$$c" ] && command -v "$$c" >/dev/null 2>&1 && is_ok "$$c" && { py="$$(command -v $$c)"; break; }; \
	done; \
	if [ -z "$$py" ] && command -v pyenv >/dev/null 2>&1; then \
	  root="$$(pyenv root)"; \
	  for v in $$(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9]|[2-9][0-9])' | sort -V); do \
	    c="$$root/versions/$$v/bin/python3"; [ -x "$$c" ] && is_ok "$$c" && { py="$$c"; break; }; \
	  done; \
	fi; \
	if [ -z "$$py" ]; then \
	  echo "error: spinverse-fem needs Python >= 3.12 (the dolfinx-solver-real wheels exist only for 3.12+)." >&2; \
	  echo "Install one, e.g. 'pyenv install 3.12' or 'apt-get install python3.12 python3.12-venv'," >&2; \
	  echo "or point SPINVERSE_PYTHON at it: make SPINVERSE_PYTHON=/path/to/python3.12 test" >&2; \
	  exit 2; \
	fi; \
	echo "Creating $(VENV) with $$py ($$($$py --version))"; \
	"$$py" -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) run_inversion.py

test: test-serial test-mpi

test-serial: $(STAMP)
	timeout $(SERIAL_TIMEOUT) $(PY) -m pytest $(PYTEST_FLAGS) tests

# one BLAS thread per rank: 2 ranks x 2 threads on 2 cores thrash (measured 4x slower)
test-mpi: $(STAMP)
	OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 timeout $(MPI_TIMEOUT) $(MPIEXEC) -n 2 $(PY) -m pytest $(PYTEST_FLAGS) tests

bench: $(STAMP)
	$(PY) benchmarks/forward.py

clean:
	rm -rf $(VENV) out build *.egg-info
