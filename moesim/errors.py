"""The one error type for bad input: a malformed trace, config, plan or topology, or an
infeasible request. The CLI prints it as one line and exits with status 2."""

from __future__ import annotations


class InputError(Exception):
    """Bad input, located by the file (or other source) and the field that is wrong."""

    def __init__(self, source: object, field: str, message: str) -> None:
        self.source = str(source)
        self.field = field
        self.message = message
        super().__init__(f"{self.source}: {field}: {message}")
