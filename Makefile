# The two commands (README): `make run` and `make test`. Everything else has its own target.
.PHONY: setup run test lint clean

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
