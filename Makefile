# Every routine task has a target here, so nobody has to remember a command
# line.  Each target installs what it needs first and skips what is in place.

SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
APT_PKGS := qemu-system-x86 qemu-utils libsystemd-dev pkg-config iproute2 zstd \
            socat binutils gcc make systemd python3-venv python3-dev util-linux libssl-dev \
            swtpm swtpm-tools ovmf bzip2 xz-utils lzop
# Installed without their recommends: virtinst would pull in a libvirt daemon
# (and a viewer) that the tests never use and that must not run on a CI host;
# the tests run their own Open vSwitch daemons per test host.
APT_PKGS_BARE := virtinst xorriso openvswitch-switch
NATIVE_SRC := $(wildcard native/ferry_native/*.pyx native/ferry_native/*.pxd)
PYTEST_ARGS ?=

.PHONY: all deps venv build lint test unit e2e demo bench clean

all: build

# apt packages: only touched when one of them is missing.
deps:
	@missing=""; for p in $(APT_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	bare=""; for p in $(APT_PKGS_BARE); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || bare="$$bare $$p"; \
	done; \
	if [ -n "$$missing$$bare" ]; then apt-get update -qq; fi; \
	if [ -n "$$missing" ]; then \
	  echo "installing apt packages:$$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi; \
	if [ -n "$$bare" ]; then \
	  echo "installing apt packages (no recommends):$$bare"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$bare >/dev/null; \
	fi

$(VENV)/.deps-stamp: pyproject.toml | deps
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "setuptools>=75" wheel "cython>=3.0"
	$(VPY) -m pip install -q $$($(VPY) -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print(" ".join(repr(d) for d in p["dependencies"] + p["optional-dependencies"]["dev"]))' | tr -d "'")
	touch $@

venv: $(VENV)/.deps-stamp

# Editable install: Python sources are live, the Cython extension is built
# in place and rebuilt when a .pyx/.pxd changes.
$(VENV)/.build-stamp: $(VENV)/.deps-stamp $(NATIVE_SRC) pyproject.toml
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: deps $(VENV)/.build-stamp

lint: build
	$(VENV)/bin/ruff check packages agents native tools tests
	$(VENV)/bin/mypy packages/ferry agents/ferry_source agents/ferry_destination native/ferry_native tools/ferryctl

unit: build
	$(VENV)/bin/pytest -q tests/unit tests/fuzz $(PYTEST_ARGS)

e2e: build
	$(VENV)/bin/pytest -q tests/e2e $(PYTEST_ARGS)

test: build lint
	$(VENV)/bin/pytest -q tests $(PYTEST_ARGS)

demo: build
	$(VPY) tools/demo.py

bench: build
	$(VPY) tools/bench/relay.py

# Install on this host, or under DESTDIR for a package: a venv in /opt/ferry
# (non-editable, compiled ferry_native), the commands linked into
# $(PREFIX)/bin, the systemd units, tmpfiles.d and sysusers.d, and a starting
# /etc/ferry/agent.toml only when there is none. See tools/install.sh.
PREFIX ?= /usr/local
DESTDIR ?=
.PHONY: install
install: deps
	DESTDIR="$(DESTDIR)" PREFIX="$(PREFIX)" $(SHELL) tools/install.sh

clean:
	rm -rf build $(VENV) native/ferry_native/*.c native/ferry_native/*.so *.egg-info packages/*.egg-info
