# qcow2aio developer tasks. `make test` and `make demo` work on a fresh machine:
# they create the virtual environment and install QEMU's tools (the test oracle) as needed.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Re-install only when pyproject.toml changes (or the venv is gone).
STAMP  := $(VENV)/.installed.stamp
# Extra arguments for pytest, e.g. `make test PYTEST_ARGS='-k refcount'`.
PYTEST_ARGS ?=

.PHONY: all venv qemu test lint demo stress fuzz bench clean

all: test

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

# qemu-img / qemu-io (Debian's qemu-utils, QEMU 7.2 on bookworm) are the reference the
# interop tests compare against; they must be present, never silently skipped.
qemu:
	@if command -v qemu-img >/dev/null 2>&1 && command -v qemu-io >/dev/null 2>&1 && \
		command -v qemu-nbd >/dev/null 2>&1 && command -v nbdinfo >/dev/null 2>&1 && \
		command -v nbdcopy >/dev/null 2>&1 && command -v nbdsh >/dev/null 2>&1 && \
		command -v certtool >/dev/null 2>&1; then \
		exit 0; \
	fi; \
	if [ "$$(id -u)" -eq 0 ]; then \
		SUDO=; \
	elif command -v sudo >/dev/null 2>&1; then \
		SUDO=sudo; \
	else \
		echo "error: QEMU's tools or the NBD clients are missing and neither root nor sudo is available to install them" >&2; \
		exit 1; \
	fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
		echo "error: QEMU's tools or the NBD clients are missing and apt-get is not available; install qemu-utils, libnbd-bin, python3-libnbd, gnutls-bin by hand" >&2; \
		exit 1; \
	fi; \
	echo "installing qemu-utils (qemu-img, qemu-io, qemu-nbd), libnbd-bin (nbdinfo, nbdcopy), python3-libnbd (nbdsh), gnutls-bin (certtool) with apt-get"; \
	$$SUDO apt-get update && \
	$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y qemu-utils libnbd-bin python3-libnbd gnutls-bin || { \
		echo "error: could not install qemu-utils libnbd-bin python3-libnbd gnutls-bin" >&2; exit 1; \
	}; \
	for tool in qemu-img qemu-io qemu-nbd nbdinfo nbdcopy nbdsh certtool; do \
		command -v $$tool >/dev/null 2>&1 || { echo "error: $$tool is still not on PATH" >&2; exit 1; }; \
	done

# Two workers: the machines have 2 cores and the suite must stay well under 10 minutes.
test: venv qemu
	QCOW2AIO_REQUIRE_QEMU=1 $(PY) -m pytest -q -n 2 --timeout=600 --durations=15 -p tests.sim_report $(PYTEST_ARGS)

# The full race, fault and power-cut sets (issue 4): >= 10,000 seeds per scenario, every
# fault point x error kind, >= 20,000 crash states; and the thread scenarios (issue 10):
# 10,000 seeds per scenario and driver, real threads and event loops on one image.
# Image operations mid-I/O (issue 12): 1,000 seeds per scenario and driver (300
# encrypted), over 2,000 crash states per operation, every resize I/O step x error kind.
# Takes a long while; prints the counts.
# --maxschedchunk 1: xdist hands out tests one at a time, so the 30 long interleaving
# tests (first in collection order) do not all land on one worker while the other idles.
# Coverage-guided fuzzing of the NBD server's handshake and transmission parsers
# (atheris); new inputs that reach new code are added to tests/nbd_corpus.
FUZZ_RUNS ?= 1000000
fuzz: venv qemu
	$(VENV)/bin/pip install -q -e '.[fuzz]'
	$(PY) tests/fuzz_nbd.py tests/nbd_corpus -runs=$(FUZZ_RUNS) -max_len=4096 -print_final_stats=1

stress: venv qemu
	QCOW2AIO_REQUIRE_QEMU=1 QCOW2AIO_STRESS=1 $(PY) -m pytest -q -s -n 2 --maxschedchunk 1 \
		-p no:cacheprovider \
		-p tests.sim_report -p tests.crashsim \
		tests/test_interleavings.py tests/test_thread_interleavings.py \
		tests/test_ops_races.py \
		tests/test_faults.py tests/test_powercut.py tests/test_ops_powercut.py tests/test_amend.py

lint: venv
	$(VENV)/bin/ruff check qcow2aio tests
	$(VENV)/bin/ruff format --check qcow2aio tests
	$(VENV)/bin/mypy --strict qcow2aio

demo: venv qemu
	$(PY) -m qcow2aio.demo

# qcow2aio against QEMU (qemu-img bench / convert), workload by workload; a few minutes.
# Table on stdout, JSON in benchmarks/results/latest.json. Extra arguments go in
# BENCH_ARGS, e.g. `make bench BENCH_ARGS='--quick -k randread'`.
BENCH_ARGS ?=
bench: venv qemu
	$(PY) -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
