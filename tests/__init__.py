"""Test packages: `tests.runtime`, `tests.simulator` (this file makes their modules import as
tests.*, so that tests/runtime/ never shadows the `runtime` package)."""
