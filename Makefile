# The two commands (README): `make run` and `make test`. Everything else has its own target.
.PHONY: setup run test test-scale test-mypyc lint clean deb install install-docs docs demo \
	bench torture e2e-libvirt cluster
PREFIX ?= /usr/local

setup:
	@sh scripts/setup.sh

# Start lockd in the foreground on its default paths (as root: /run/lockd, /var/lib/lockd).
run: setup
	.venv/bin/lockd $(ARGS)

# Every file that takes no machine-wide resource on two xdist workers, then those that do,
# one after another (tests/conftest.py: MACHINE_WIDE). Exit 5 is "no test selected" (a
# PYTEST_ARGS that selects tests of only one of the two runs).
test: setup
	.venv/bin/python -m pytest -q -n 2 --dist loadfile -m "not machine_wide" $(PYTEST_ARGS) \
		|| [ $$? -eq 5 ]
	.venv/bin/python -m pytest -q -m machine_wide $(PYTEST_ARGS) || [ $$? -eq 5 ]

# The tests marked `scale` at the size the docs' figures were measured at (tests/scale.py):
# 10,000 leases under systemd, 3,000 re-parked at a start, a 20 s symlink race, 100,000
# fuzzed messages. `make test` runs the same tests, smaller.
test-scale: setup
	LOCKD_TEST_SCALE=1 .venv/bin/python -m pytest -q -m scale $(PYTEST_ARGS)

# The libvirt end-to-end tests alone (also part of `make test`): a real libvirtd runs TCG QEMU
# domains with lockd as its lock daemon, in a private container (~40 s); step timings at the end.
e2e-libvirt: setup
	.venv/bin/python -m pytest -q -rs tests/test_libvirt.py $(PYTEST_ARGS)

# Two libvirt hosts on one GlusterFS volume (tests/test_cluster.py, README "A libvirt cluster
# on shared storage"): migration, a third party in the handover gap, lockd beside virtlockd,
# a hung mount, lockd killed mid-migration, host death, a partition (~4-5 min). `make test` runs
# only its first test, on the direct lockspace (~25 s).
cluster: setup
	LOCKD_CLUSTER=1 .venv/bin/python -m pytest -q -rs tests/test_cluster.py $(PYTEST_ARGS)

# The optional compiled build (setup.py: LOCKD_MYPYC=1 compiles the hot path with mypyc) in
# build/mypyc/, and the tests against it: every daemon tests/e2e.py starts runs from there
# (the systemd and torture tests start the installed or the source tree's lockd, pure
# Python). `make test` runs pure Python.
test-mypyc: setup
	scripts/build-mypyc.sh
	LOCKD_E2E_TREE=$(CURDIR)/build/mypyc .venv/bin/python -m pytest -q $(PYTEST_ARGS)

# A private, real systemd with the project's units: lockd aborted, no lock ever free (~10 s).
demo: setup
	.venv/bin/python scripts/demo.py

lint: setup
	.venv/bin/ruff check lockd tests scripts bench torture
	.venv/bin/ruff format --check lockd tests scripts bench torture
	.venv/bin/mypy

# Benchmarks (bench/README.md): ~4 minutes; BENCH_ARGS=--quick for ~1 minute. Results in
# results/ (or $OUT). Speed is never asserted by `make test`.
bench: setup
	.venv/bin/python -m bench $(BENCH_ARGS)

# Crash torture (torture/__init__.py): 1,000 crash/restart cycles, each checked against the
# clients' answers and the kernel's locks (~5 minutes). TORTURE_ARGS='--cycles N --seed S
# --duration SECONDS ...'; exits 1 on any violation and keeps its work directory.
torture: setup
	.venv/bin/python -m torture $(TORTURE_ARGS)

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache build dist

# The manual, the sample config and the completion, from man/manual.toml and the parsers
# (scripts/manpages.py); commit what it writes (tests/test_docs.py checks it is current).
docs: setup
	.venv/bin/python scripts/manpages.py

# Man pages, bash completion, and the sample config unless one exists (DESTDIR, PREFIX).
install-docs:
	install -D -m 0644 man/lockd.8 $(DESTDIR)$(PREFIX)/share/man/man8/lockd.8
	install -D -m 0644 man/lockctl.1 $(DESTDIR)$(PREFIX)/share/man/man1/lockctl.1
	install -D -m 0644 man/lockd.conf.5 $(DESTDIR)$(PREFIX)/share/man/man5/lockd.conf.5
	install -D -m 0644 completion/lockctl.bash \
		$(DESTDIR)$(PREFIX)/share/bash-completion/completions/lockctl
	[ -e $(DESTDIR)/etc/lockd/lockd.conf ] || \
		install -D -m 0644 etc/lockd.conf $(DESTDIR)/etc/lockd/lockd.conf

# The Debian package (README, "Install on a host"): dist/lockd_<version>_<arch>.deb with lockd and
# its dependencies in a private virtual environment, then lintian (about 25 s with a warm pip
# cache, a minute from nothing, lintian 25 s more). Installs its build dependencies.
deb:
	sh scripts/build-deb.sh

# Install on this host for real: the package above, through apt (nothing points into this
# checkout). An installed lockd is upgraded in place by re-exec, every lock kept.
install: deb
	apt-get install -y ./dist/lockd_$$(sed -n 's/^__version__ = "\(.*\)"$$/\1/p' lockd/__init__.py)_$$(dpkg --print-architecture).deb
