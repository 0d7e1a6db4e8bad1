# dynoagent — the two front-door commands are `make run` and `make test`.
# Set-up is idempotent: Debian packages are installed only when missing, the virtualenv
# only when pyproject.toml changed since it was last built.

SHELL := /bin/bash
PYTHON ?= /usr/bin/python3
VENV := .venv
BIN := $(VENV)/bin
STAMPS := .stamps
APT_PACKAGES := python3 python3-venv python3-dev nftables iproute2 tini runc crun busybox-static \
                libsystemd-dev pkg-config gcc procps util-linux systemd mmdebstrap etcd-server \
                etcd-client rsyslog rsyslog-gnutls prometheus
VM_APT_PACKAGES := qemu-system-x86 qemu-utils e2fsprogs linux-image-amd64
PYTEST := $(BIN)/pytest
CHECKED := agent cgroups netns dynocoord

.PHONY: setup setup-vm setup-stack setup-wheels run test test-unit test-privileged test-e2e test-fuzz test-vm test-systemd \
        fuzz lint bench clean deb check-deb

setup: $(STAMPS)/apt $(BIN)/.installed

# dpkg-query answers in milliseconds; apt-get runs only for what is missing.
$(STAMPS)/apt: Makefile
	@mkdir -p $(STAMPS)
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@touch $@

# The stack of the e2e tests' named-stack dynos (tests/e2e/test_stacks.py, tests/support/stacks.py),
# built once from Debian's archive (≈ 1 min, ≈ 160 MB) and kept across runs and clean clones:
# `stack build` does nothing when the stack there was built from the same inputs.
TEST_STACKS_STATE := /var/cache/dynoagent-tests
TEST_STACK := test-bookworm
setup-stack: setup
	$(BIN)/dynoagent stack build $(TEST_STACK) --state-dir $(TEST_STACKS_STATE)

# Wheels of the e2e tests' Django app (tests/e2e/apps/django), which the test serves to its
# build from a package index inside its own namespaces: downloaded once per requirements.txt.
TEST_WHEELS := /var/cache/dynoagent-tests/wheels
DJANGO_REQUIREMENTS := tests/e2e/apps/django/requirements.txt
setup-wheels: setup
	@dir=$(TEST_WHEELS)/$$(sha256sum $(DJANGO_REQUIREMENTS) | cut -c1-16); \
	if [ ! -f $$dir/.complete ]; then \
	  echo "downloading the wheels of $(DJANGO_REQUIREMENTS) into $$dir"; \
	  mkdir -p $$dir && $(BIN)/pip download -q --only-binary=:all: --python-version 3.11 \
	    --dest $$dir -r $(DJANGO_REQUIREMENTS) && touch $$dir/.complete; \
	fi

# The VM tier (tests/vm): qemu + Debian's stock kernel + virtme-ng in the venv, each only
# when missing. Another apt run may hold the dpkg lock (first boot): wait for it, bounded.
setup-vm: setup
	@missing=$$(for p in $(VM_APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  apt-get -o DPkg::Lock::Timeout=600 update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq $$missing; \
	fi
	@test -x $(BIN)/vng || $(BIN)/pip install -q virtme-ng

# The editable install as a plain path in a .pth (compat mode), not setuptools' import hook:
# the hook imports pathlib and walks a finder on every start of dynoctl and dynoagent, some
# 10 ms of each `dynoctl run`. dynoctl is then the package's own launcher, pointed at this
# venv and tree: pip's console script would start the site module first.
# The venv's interpreter is the one the package runs on (Debian's python3, built with PGO and
# LTO); a venv made by another interpreter is made again.
$(BIN)/.installed: pyproject.toml Makefile packaging/bin/dynoctl | $(STAMPS)/apt
	@if [ -x $(BIN)/python3 ] && [ "$$(readlink -f $(BIN)/python3)" != "$$(readlink -f $(PYTHON))" ]; then \
	  echo "$(VENV) was made by $$(readlink -f $(BIN)/python3), not $(PYTHON): making it again"; \
	  rm -rf $(VENV); \
	fi
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]' --config-settings editable_mode=compat
	sed -e '1s|^#!.*|#!$(abspath $(BIN))/python3 -IS|' \
	    -e 's|^VENV = .*|VENV = "$(abspath $(VENV))"|' -e 's|^ROOT = .*|ROOT = "$(CURDIR)"|' \
	    packaging/bin/dynoctl > $(BIN)/dynoctl.new
	chmod 755 $(BIN)/dynoctl.new && mv $(BIN)/dynoctl.new $(BIN)/dynoctl
	@touch $@

lint: setup
	$(BIN)/ruff check $(CHECKED) tests
	$(BIN)/mypy $(CHECKED)

test-unit: setup
	$(PYTEST) tests/unit

test-privileged: setup
	$(PYTEST) tests/privileged

test-e2e: setup setup-stack setup-wheels
	$(PYTEST) tests/e2e

# Hostile input against the real daemon: a fuzzing coordinator and a fuzzing operator API
# client, 40 s each (≈ 2 min in all). The seed is printed in the header; FUZZ_SEED=N replays it.
test-fuzz: setup
	$(PYTEST) tests/fuzz

# The same fuzzers for longer (FUZZ_BUDGET_S seconds each, 300 by default), with a bigger
# mass removal (FUZZ_MASS_DYNOS).
fuzz: setup
	FUZZ_BUDGET_S=$${FUZZ_BUDGET_S:-300} FUZZ_MASS_DYNOS=$${FUZZ_MASS_DYNOS:-50} $(PYTEST) tests/fuzz

# Two TCG boots of ≈ 20 s each plus the cgroup tests inside the guest.
test-vm: setup-vm
	$(PYTEST) tests/vm --ignore=tests/vm/test_systemd_host.py

# The package on a systemd host (tests/vm/test_systemd_host.py): a Debian 12 guest with
# systemd as PID 1 on pure cgroup v2 under qemu (TCG), its root built once by mmdebstrap into
# /var/cache/dynoagent-tests/vm-systemd (keyed by its inputs), the newest dist/*.deb
# installed with dpkg, then the scenarios; two boots (the last scenario reboots).
test-systemd: setup-vm deb
	$(PYTEST) tests/vm/test_systemd_host.py

test: lint setup-stack setup-wheels
	$(PYTEST) tests/unit tests/privileged tests/e2e
	$(PYTEST) tests/fuzz
	$(MAKE) --no-print-directory test-vm
	$(MAKE) --no-print-directory check-deb test-systemd

# The example app with full isolation, like `heroku local`: http://127.0.0.1:5000, logs on
# this terminal, `dynoctl ps` from another one; Ctrl-C stops everything. ARGS passes more
# options to `dynoagent up` (e.g. ARGS="--formation web=2,worker=1 --port 5001").
run: setup
	$(BIN)/dynoagent up examples/hello $(ARGS)

bench: setup
	$(BIN)/python -m tests.bench $(BENCH)

# The Debian package, dist/dynoagent_<version>_<arch>.deb (packaging/README.md): the project
# and its pinned dependencies in a private virtualenv under /usr/lib/dynoagent, built with
# Debian's python3 (not the development venv's). Needs no `setup`; its own build tools are
# installed only when missing. check-deb: lintian, contents, man pages, the tree run in a
# private mount namespace; nothing is installed on this machine.
DEB_APT_PACKAGES := python3 python3-venv python3-dev gcc pkg-config libsystemd-dev libyaml-dev \
                    binutils dpkg-dev git lintian man-db systemd util-linux
$(STAMPS)/deb-apt: Makefile
	@mkdir -p $(STAMPS)
	@missing=$$(for p in $(DEB_APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  apt-get -o DPkg::Lock::Timeout=600 update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq $$missing; \
	fi
	@touch $@

deb: $(STAMPS)/deb-apt
	packaging/build-deb

check-deb: deb
	packaging/check-deb

clean:
	rm -rf $(VENV) $(STAMPS) build dist *.egg-info
