# printer-connector: every entry point a developer or CI needs.
# Each target does its own set-up (virtual environments with pinned packages,
# the Debian packages the tests need), so `make demo` and `make test` work on
# a fresh machine with nothing run first.

PYTHON      ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
MR_VENV     := .venv-moonraker
KL_VENV     := .venv-klipper
BUILD_VENV  := .venv-build
# libusb-dev: pip builds klippy's C helper (chelper), which includes usb.h.
DEB_PACKAGES := busybox shellcheck dash gcc libc6-dev libusb-dev

.PHONY: all demo printer test test-fast fuzz fixtures lint binary pyz installers binary-all binary-mipsle bench soak clean venv deb-deps

all: test

$(VENV)/.stamp: requirements/runtime.txt requirements/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements/dev.txt
	touch $@

$(MR_VENV)/.stamp: requirements/moonraker.txt
	$(PYTHON) -m venv $(MR_VENV)
	$(MR_VENV)/bin/pip install -q --disable-pip-version-check -r requirements/moonraker.txt
	touch $@

# The real Klipper host (klippy) for the real-Klipper rig (sim/rig.py); pip
# compiles its C helper with gcc, hence deb-deps first.
$(KL_VENV)/.stamp: requirements/klipper.txt | deb-deps
	$(PYTHON) -m venv $(KL_VENV)
	$(KL_VENV)/bin/pip install -q --disable-pip-version-check -r requirements/klipper.txt
	touch $@

venv: $(VENV)/.stamp

deb-deps:
	sh build/ensure-debian-packages.sh $(DEB_PACKAGES)

# The product's main job end to end, on loopback: reference cloud, printer
# simulator, a connector paired with a demo token, a few commands.
# PRINTER=klipper runs it on the real-Klipper rig instead of the simulator.
demo: venv $(if $(filter klipper,$(PRINTER)),$(MR_VENV)/.stamp $(KL_VENV)/.stamp)
	$(PY) sim/demo.py $(if $(filter klipper,$(PRINTER)),--printer klipper)

# A real Klipper (simulated MCU) and a real Moonraker on loopback, in the
# foreground: prints Moonraker's URL for a browser or a connector config.
printer: venv $(MR_VENV)/.stamp $(KL_VENV)/.stamp
	$(PY) sim/rig.py

# The test files run in parallel (pytest-xdist), each whole in one worker:
# its module fixtures (real Moonrakers, the Klipper rig) start once and its
# tests keep their order. Most tests wait on processes and sockets, not on
# the CPU, so more workers than CI's 2 cores pay; TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= 4
PYTEST := MOONRAKER_BIN=$(CURDIR)/$(MR_VENV)/bin/moonraker $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# Everything CI checks. The host binary, the zipapp and the standalone
# installers are built first so the tests can run them.
test: venv $(MR_VENV)/.stamp $(KL_VENV)/.stamp deb-deps pyz binary installers
	$(PYTEST) tests

# The tests without the artifacts (quick loop while editing connector.py).
test-fast: venv $(MR_VENV)/.stamp $(KL_VENV)/.stamp deb-deps installers
	$(PYTEST) tests -m "not artifacts"

# Coverage-guided fuzzing of the readers of peer answers (tests/fuzz/, atheris):
# FUZZ_RUNS inputs per target from a fixed seed; a failing input is written
# to build/work/fuzz-crash-*. The property-based tests run in `make test`.
FUZZ_RUNS ?= 100000
fuzz: venv
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements/fuzz.txt
	mkdir -p build/work
	for target in tests/fuzz/fuzz_*.py; do \
		$(PY) "$$target" -runs=$(FUZZ_RUNS) -seed=1 -max_len=4096 -artifact_prefix=build/work/fuzz- || exit 1; \
	done

# Records again what the real Moonraker answers (tests/fixtures/), for the
# tests that hold the simulator and the Moonraker client to it.
fixtures: venv $(MR_VENV)/.stamp
	MOONRAKER_BIN=$(CURDIR)/$(MR_VENV)/bin/moonraker $(PY) tests/fixtures/record.py

pyz: venv
	sh build/build-pyz.sh

# The four standalone installers (install-klipper.sh, install-k1.sh,
# update.sh, uninstall.sh) from installers/src/ and installers/lib/, into
# dist/installers/; a release makes them pinned to its version, in dist/.
installers:
	sh build/build-installers.sh

binary: deb-deps
	sh build/build-binary.sh host

binary-mipsle:
	sh build/build-mipsle.sh

binary-all:
	sh build/build-all.sh

bench: venv
	$(PY) bench/bench.py --write-doc bench/README.md --write-doc docs/benchmarks.md

soak: venv
	$(PY) bench/bench.py --soak

clean:
	rm -rf dist build/work .pytest_cache
