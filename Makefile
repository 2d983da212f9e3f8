# The two commands (README): `make run` and `make test`. Everything else has its own target.
.PHONY: setup run test lint clean install

setup:
	@sh scripts/setup.sh

# Start lockd in the foreground on its default paths (as root: /run/lockd, /var/lib/lockd).
run: setup
	.venv/bin/lockd $(ARGS)

test: setup
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)

lint: setup
	.venv/bin/ruff check lockd tests
	.venv/bin/ruff format --check lockd tests
	.venv/bin/mypy

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache

# Install for real: console scripts on PATH, units in /etc/systemd/system, sockets enabled.
install: setup
	ln -sf $(CURDIR)/.venv/bin/lockd /usr/local/bin/lockd
	ln -sf $(CURDIR)/.venv/bin/lockctl /usr/local/bin/lockctl
	install -m 0644 systemd/lockd.service systemd/lockd.socket systemd/lockd-admin.socket /etc/systemd/system/
	if [ "$$(systemctl --version | awk 'NR==1{print $$2}')" -ge 254 ]; then \
		install -d /etc/systemd/system/lockd.service.d && \
		install -m 0644 systemd/lockd.service.d/50-fdstore-preserve.conf /etc/systemd/system/lockd.service.d/; fi
	systemctl daemon-reload
	systemctl enable --now lockd.socket lockd-admin.socket
