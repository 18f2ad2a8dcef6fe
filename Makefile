# hast: Highly Available Storage. See README.md.
#
#   make deps    install the system packages the build and the tests need
#   make         build hastd and hastctl (release)
#   make test    install what is needed, then run every test
#   make test-kshim  the kernel module on the userland kernel shim (C driver)
#   make demo    set up two nodes on this machine and walk through the main job
#   make bench   NBD export of a primary vs qemu-nbd with fio, as ratios (BENCHMARKS.md)
#   make install install binaries, man pages and the sample configuration
#   make kmod-check SYSDIR=/path/to/freebsd/sys
#                compile-check the geom_hast kernel module against that tree
#                (clang, kernel flags, -Werror, plain and INVARIANTS/WITNESS)

CARGO    ?= cargo
PREFIX   ?= /usr/local
DESTDIR  ?=
UNAME_S  := $(shell uname -s)

DEB_PKGS = build-essential pkg-config clang libclang-dev qemu-utils libnbd-bin \
	python3-libnbd nbdkit fio fuse3 nftables iproute2 mandoc \
	freebsd-manpages shellcheck e2fsprogs util-linux procps psmisc liblzf-dev
PKG_PKGS = rust llvm qemu-tools libnbd fio shellcheck

.PHONY: all build deps test test-rust test-scripts test-freebsd-check test-kshim demo bench install clean kmod-check

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

test: deps test-scripts test-freebsd-check test-kshim test-rust

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

demo: deps
	$(CARGO) build --workspace
	sh tests/demo.sh

bench: deps
	$(CARGO) build --release -p hastd -p hastctl
	$(CARGO) build --release -p hast --examples
	$(CARGO) build --release -p hast-tests --bin replbench
	sh tests/bench/nbd.sh
	sh tests/bench/replication.sh

install: build
	install -d $(DESTDIR)$(PREFIX)/sbin $(DESTDIR)$(PREFIX)/share/man/man4 $(DESTDIR)$(PREFIX)/share/man/man5 $(DESTDIR)$(PREFIX)/share/man/man8 $(DESTDIR)$(PREFIX)/share/examples/hast
	install -m 0555 target/release/hastd target/release/hastctl $(DESTDIR)$(PREFIX)/sbin/
	install -m 0444 docs/geom_hast.4 $(DESTDIR)$(PREFIX)/share/man/man4/
	install -m 0444 docs/hast.conf.5 $(DESTDIR)$(PREFIX)/share/man/man5/
	install -m 0444 docs/hastd.8 docs/hastctl.8 $(DESTDIR)$(PREFIX)/share/man/man8/
	install -m 0444 docs/hast.conf.sample $(DESTDIR)$(PREFIX)/share/examples/hast/

kmod-check:
	@if [ -z "$(SYSDIR)" ]; then \
		echo "make kmod-check: SYSDIR is not set; give a FreeBSD sys/ tree," \
		    "e.g. make kmod-check SYSDIR=/usr/src/sys" >&2; \
		exit 2; \
	fi
	sh tests/kmod-check.sh $(SYSDIR)

clean:
	$(CARGO) clean
