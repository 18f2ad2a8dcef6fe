# hast: Highly Available Storage. See README.md.
#
#   make deps    install the system packages the build and the tests need
#   make         build hastd and hastctl (release)
#   make test    install what is needed, then run every test
#   make test-kshim  the kernel module on the userland kernel shim (C driver)
#   make demo    set up two nodes on this machine and walk through the main job
#   make campaign [FAULTS=N SEED=S]
#                seeded random faults (kill -9, power cuts, partitions,
#                restarts, disk errors, role swaps) against a pair under a
#                checked workload; root and /dev/fuse; FAULTS=1000 takes hours
#   make bench   NBD export of a primary vs qemu-nbd with fio, then replication
#                (fullsync, memsync, async) vs qemu-storage-daemon's quorum
#                and an unreplicated qemu-nbd, and TLS vs plain replication,
#                as ratios (BENCHMARKS.md), then metrics on vs off (needs a
#                quiet machine)
#   make install install binaries, man pages and the sample configuration
#   make fuzz FUZZ_SECONDS=N
#                run every fuzz target of fuzz/ for N seconds (nightly
#                toolchain and cargo-fuzz; docs/FUZZING.md)
#   make fuzz-corpus
#                rebuild the seed inputs and minimize them, with what the
#                fuzzer found in fuzz/found/, into fuzz/corpus/
#   make kmod-check SYSDIR=/path/to/freebsd/sys
#                compile-check the geom_hast kernel module against that tree
#                (clang, kernel flags, -Werror, plain and INVARIANTS/WITNESS)

CARGO    ?= cargo
PREFIX   ?= /usr/local
DESTDIR  ?=
UNAME_S  := $(shell uname -s)
# No incremental state: a clean build (CI) does not reuse it, and it doubles
# the disk a build needs. Set CARGO_INCREMENTAL=1 for edit-compile loops.
export CARGO_INCREMENTAL ?= 0

DEB_PKGS = build-essential pkg-config clang libclang-dev qemu-utils libnbd-bin \
	python3-libnbd nbdkit fio fuse3 nftables iproute2 mandoc \
	freebsd-manpages shellcheck e2fsprogs util-linux procps psmisc liblzf-dev \
	prometheus python3-jsonschema curl
PKG_PKGS = rust llvm qemu-tools libnbd fio shellcheck

# Fuzzing: seconds per target (0: no limit), executions per target (empty:
# no limit), memory bound (MB, also the largest single allocation), seconds
# after which one input counts as a hang.
FUZZ_SECONDS ?= 60
FUZZ_RUNS    ?=
FUZZ_RSS_MB  ?= 1024
FUZZ_TIMEOUT ?= 10
FUZZ_TARGETS ?=
# Seconds per target in make test: enough to show the targets build and run.
FUZZ_SMOKE_SECONDS ?= 3

.PHONY: all build deps test test-rust test-scripts test-lint test-release test-freebsd-check test-kshim test-fuzz test-campaign fuzz fuzz-corpus campaign demo bench install clean kmod-check

all: build

# Only the binaries: the test crate turns on test-only fail points.
build:
	$(CARGO) build --release -p hastd -p hastctl

deps:
ifeq ($(UNAME_S),FreeBSD)
	pkg install -y $(PKG_PKGS)
else
	@missing=""; for p in $(DEB_PKGS); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "make deps: installing$$missing"; \
		SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	else \
		echo "make deps: all system packages present"; \
	fi
endif
	@command -v $(CARGO) >/dev/null || { echo "make deps: cargo not found; install Rust (rustup) first" >&2; exit 1; }
	@if ! $(CARGO) +nightly --version >/dev/null 2>&1; then \
		echo "make deps: no nightly toolchain: the fuzz targets will be skipped"; \
	elif ! $(CARGO) fuzz --version >/dev/null 2>&1; then \
		echo "make deps: installing cargo-fuzz"; \
		$(CARGO) install --locked cargo-fuzz; \
	fi

test: deps test-scripts test-lint test-freebsd-check test-release test-kshim test-rust test-fuzz test-campaign

# The kernel module itself (kmod/g_hast.c, hast_core.c, unchanged) on the
# userland kernel shim (sys/kshim): its C driver, and bugs planted in a copy
# of the module that the shim must catch. The same driver built with
# AddressSanitizer and ThreadSanitizer runs in cargo test
# (tests/tests/kshim_sanitizers.rs); `sh tests/kshim-check.sh` runs all.
test-kshim:
	sh tests/kshim-check.sh plain plants

# Type-check the FreeBSD build (kernel transport, cfg'd file I/O) from any
# host: needs the x86_64-unknown-freebsd target of rustup.
FREEBSD_TARGET = x86_64-unknown-freebsd
test-freebsd-check:
ifeq ($(UNAME_S),FreeBSD)
	@echo "test-freebsd-check: native FreeBSD build, nothing to cross-check"
else
	@if ! rustup target list --installed 2>/dev/null | grep -qx $(FREEBSD_TARGET); then \
		timeout 120 rustup target add $(FREEBSD_TARGET) >/dev/null 2>&1 || true; \
	fi; \
	if rustup target list --installed 2>/dev/null | grep -qx $(FREEBSD_TARGET); then \
		echo "$(CARGO) check --target $(FREEBSD_TARGET) -p hast -p hastd -p hastctl --all-targets"; \
		$(CARGO) check --target $(FREEBSD_TARGET) -p hast -p hastd -p hastctl --all-targets; \
	else \
		echo "test-freebsd-check: SKIPPED: rustup target $(FREEBSD_TARGET) is not installed and could not be added"; \
	fi
endif

test-rust:
	$(CARGO) build --workspace --all-targets
	$(CARGO) test --workspace --no-fail-fast

test-scripts:
	sh tests/lint.sh

# Formatting and clippy, warnings as errors.
test-lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# A plain release build at the root has no fail points and no kernel shim
# compiled in.
test-release:
	$(CARGO) build --release
	@if grep -q HAST_FAILPOINTS target/release/hastd; then \
		echo "test-release: target/release/hastd contains fail points" >&2; exit 1; \
	else \
		echo "test-release: target/release/hastd has no fail points"; \
	fi
	@if grep -q kshim_load target/release/hastd; then \
		echo "test-release: target/release/hastd contains the kernel shim" >&2; exit 1; \
	else \
		echo "test-release: target/release/hastd has no kernel shim"; \
	fi

# Each fuzz target for a few seconds, so that they keep building and
# running; skipped with a message when nightly or cargo-fuzz is missing.
test-fuzz:
	FUZZ_RSS_MB=$(FUZZ_RSS_MB) FUZZ_TIMEOUT=$(FUZZ_TIMEOUT) \
	    sh tests/fuzz.sh --smoke $(FUZZ_SMOKE_SECONDS)

fuzz:
	FUZZ_RSS_MB=$(FUZZ_RSS_MB) FUZZ_TIMEOUT=$(FUZZ_TIMEOUT) FUZZ_RUNS=$(FUZZ_RUNS) \
	    sh tests/fuzz.sh $(FUZZ_SECONDS) $(FUZZ_TARGETS)

fuzz-corpus:
	sh tests/fuzz-corpus.sh $(FUZZ_TARGETS)

# The fault campaign: FAULTS faults from SEED (tests/src/bin/campaign.rs).
# CI runs a short one with a fixed seed (test-campaign).
FAULTS ?= 20
SEED   ?= 1
CI_CAMPAIGN_FAULTS = 20
CI_CAMPAIGN_SEED   = 20261206

campaign: deps
	$(CARGO) build --workspace
	nice -n 19 target/debug/campaign --faults $(FAULTS) --seed $(SEED)

test-campaign:
	$(CARGO) build --workspace
	@if [ "$$(id -u)" != 0 ] || [ ! -e /dev/fuse ]; then \
		echo "test-campaign: SKIPPED: the campaign needs root and /dev/fuse"; \
	else \
		echo "target/debug/campaign --faults $(CI_CAMPAIGN_FAULTS) --seed $(CI_CAMPAIGN_SEED)"; \
		target/debug/campaign --faults $(CI_CAMPAIGN_FAULTS) --seed $(CI_CAMPAIGN_SEED); \
	fi

demo: deps
	$(CARGO) build --workspace
	sh tests/demo.sh

# qemu-storage-daemon (the qsd peer of tests/bench/replication.sh) is in
# qemu-utils from QEMU 8 on, in qemu-system-common before (Debian 12).
bench: deps
	@if [ "$(UNAME_S)" != FreeBSD ] && ! command -v qemu-storage-daemon >/dev/null 2>&1; then \
		echo "make bench: installing qemu-system-common (qemu-storage-daemon)"; \
		SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends qemu-system-common; \
	fi
	$(CARGO) build --release -p hastd -p hastctl
	$(CARGO) build --release -p hast --examples
	$(CARGO) build --release -p hast-tests --bin replbench
	sh tests/bench/nbd.sh
	sh tests/bench/replication.sh
	sh tests/bench/tls.sh
	sh tests/bench/metrics.sh

install: build
	install -d $(DESTDIR)$(PREFIX)/sbin $(DESTDIR)$(PREFIX)/share/man/man4 $(DESTDIR)$(PREFIX)/share/man/man5 $(DESTDIR)$(PREFIX)/share/man/man8 $(DESTDIR)$(PREFIX)/share/examples/hast
	install -m 0555 target/release/hastd target/release/hastctl $(DESTDIR)$(PREFIX)/sbin/
	install -m 0444 docs/geom_hast.4 $(DESTDIR)$(PREFIX)/share/man/man4/
	install -m 0444 docs/hast.conf.5 $(DESTDIR)$(PREFIX)/share/man/man5/
	install -m 0444 docs/hastd.8 docs/hastctl.8 $(DESTDIR)$(PREFIX)/share/man/man8/
	install -m 0444 docs/hast.conf.sample $(DESTDIR)$(PREFIX)/share/examples/hast/
	install -d $(DESTDIR)$(PREFIX)/share/hast
	install -m 0444 docs/hastctl.schema.json docs/grafana-hast.json $(DESTDIR)$(PREFIX)/share/hast/

kmod-check:
	@if [ -z "$(SYSDIR)" ]; then \
		echo "make kmod-check: SYSDIR is not set; give a FreeBSD sys/ tree," \
		    "e.g. make kmod-check SYSDIR=/usr/src/sys" >&2; \
		exit 2; \
	fi
	sh tests/kmod-check.sh $(SYSDIR)

clean:
	$(CARGO) clean
