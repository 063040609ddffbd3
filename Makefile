# mpilayer: `make demo` and `make test` do all set-up on a fresh machine.
#
# They create (or reuse) a virtual environment in $(VENV), pip-install the
# dependencies -- including the `mpich` wheel, which ships mpiexec -- and build
# the Cython kernels. To use a system MPI instead of the wheel:
#     make MPI=system test      # builds mpi4py against the mpicc on PATH
PYTHON ?= python3
VENV   ?= .venv
MPI    ?= wheel
NP     ?= 2
# pytest workers (pytest-xdist); a test file is the unit, so test_slurm.py starts one Slurm cluster
JOBS   ?= 2

BIN  := $(VENV)/bin
PY   := $(BIN)/python
DEPS := numpy scipy h5py cython pytest pytest-xdist hypothesis matplotlib scikit-learn "dask[array]" "setuptools>=68" wheel
ifeq ($(MPI),wheel)
MPI_DEPS := mpich mpi4py
else
MPI_DEPS := --no-binary mpi4py mpi4py
endif
KERNEL_SOURCES := $(wildcard cython_kernels/*.pyx cython_kernels/*.pxd cython_kernels/*.c cython_kernels/*.h)
STAMP := $(VENV)/.mpilayer-installed

.PHONY: all install demo test test-serial test-mpi bench clean
all: install

$(VENV)/.deps-installed: Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(DEPS)
	$(BIN)/pip install --quiet $(MPI_DEPS)
	touch $@

$(STAMP): $(VENV)/.deps-installed setup.py pyproject.toml $(KERNEL_SOURCES)
	$(BIN)/pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

install: $(STAMP)

demo: install
	PATH=$(abspath $(BIN)):$$PATH $(PY) jobs/demo.py

test: install
	PATH=$(abspath $(BIN)):$$PATH $(PY) -m pytest -q -ra -n $(JOBS) --dist loadfile tests

test-serial: install   # the tests that launch no mpiexec
	PATH=$(abspath $(BIN)):$$PATH $(PY) -m pytest -q -ra -n $(JOBS) --dist loadfile -m "not mpi" tests

test-mpi: install      # the tests that launch mpiexec (marker mpi)
	PATH=$(abspath $(BIN)):$$PATH $(PY) -m pytest -q -ra -n $(JOBS) --dist loadfile -m mpi tests

bench: install
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/mpilayer bench kernels

clean:
	rm -rf build *.egg-info mpilayer/*.so cython_kernels/_kernels.c
