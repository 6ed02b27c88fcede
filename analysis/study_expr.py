"""The small expression language of study files (configs/studies/README.md): arithmetic over
names, parsed once and checked, never `eval`ed.

    ep.step_ms / hp.step_ms          a field of the arm "ep" of this row's group, over "hp"'s
    model.d_model // 16              a config field, in a study's `set` (written "= ...")
    max(a, b), min, abs, round       the only calls

Numbers, strings, + - * / // % **, unary minus, names and one level of attribute (`arm.field`
or `section.field`). A division by zero is NaN, not an error: a table cell with nothing to
divide shows "n/a".
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

from moesim.errors import InputError

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}
_CALLS: dict[str, Callable[..., Any]] = {"min": min, "max": max, "abs": abs, "round": round}

# lookup(name, attribute): the value of `name` (attribute None) or of `name.attribute`
Lookup = Callable[[str, "str | None"], Any]


class Expr:
    """A parsed expression; `Expr(text, source, field)` raises InputError naming the study file
    and the field when `text` is not in the language."""

    def __init__(self, text: str, source: object, field: str) -> None:
        self.text, self.source, self.field = text, source, field
        try:
            tree = ast.parse(text.strip(), mode="eval")
        except SyntaxError as e:
            raise InputError(source, field, f"not an expression: {text!r} ({e.msg})") from None
        self._check(tree.body)
        self.tree = tree.body

    def _check(self, node: ast.AST) -> None:
        ok = (ast.Constant, ast.Name, ast.BinOp, ast.UnaryOp, ast.Call, ast.Attribute,
              ast.Load, ast.USub, ast.UAdd, *_BINARY)
        for n in ast.walk(node):
            if not isinstance(n, ok):
                raise InputError(self.source, self.field,
                                 f"{self.text!r}: {type(n).__name__} is not allowed")
            if isinstance(n, ast.Constant) and not isinstance(n.value, (int, float, str)):
                raise InputError(self.source, self.field, f"{self.text!r}: bad constant")
            if isinstance(n, ast.Attribute) and not isinstance(n.value, ast.Name):
                raise InputError(self.source, self.field,
                                 f"{self.text!r}: only name.field is allowed")
            if isinstance(n, ast.Call) and (not isinstance(n.func, ast.Name)
                                            or n.func.id not in _CALLS or n.keywords):
                raise InputError(self.source, self.field, f"{self.text!r}: calls are limited "
                                 f"to {', '.join(_CALLS)}")

    def names(self) -> set[tuple[str, str | None]]:
        """Every (name, attribute) the expression reads."""
        out: set[tuple[str, str | None]] = set()
        for n in ast.walk(self.tree):
            if isinstance(n, ast.Attribute):
                out.add((n.value.id, n.attr))  # type: ignore[attr-defined]
        attrs = {id(n.value) for n in ast.walk(self.tree) if isinstance(n, ast.Attribute)}
        calls = {id(n.func) for n in ast.walk(self.tree) if isinstance(n, ast.Call)}
        for n in ast.walk(self.tree):
            if isinstance(n, ast.Name) and id(n) not in attrs | calls:
                out.add((n.id, None))
        return out

    def __call__(self, lookup: Lookup) -> Any:
        return self._eval(self.tree, lookup)

    def _eval(self, n: ast.AST, lookup: Lookup) -> Any:
        if isinstance(n, ast.Constant):
            return n.value
        if isinstance(n, ast.Name):
            return lookup(n.id, None)
        if isinstance(n, ast.Attribute):
            return lookup(n.value.id, n.attr)  # type: ignore[attr-defined]
        if isinstance(n, ast.UnaryOp):
            v = self._eval(n.operand, lookup)
            return -v if isinstance(n.op, ast.USub) else +v
        if isinstance(n, ast.Call):
            return _CALLS[n.func.id](*(self._eval(a, lookup) for a in n.args))  # type: ignore
        assert isinstance(n, ast.BinOp)
        a, b = self._eval(n.left, lookup), self._eval(n.right, lookup)
        try:
            return _BINARY[type(n.op)](a, b)
        except ZeroDivisionError:
            return math.nan
        except TypeError as e:
            raise InputError(self.source, self.field, f"{self.text!r}: {e}") from None

    def __repr__(self) -> str:
        return f"Expr({self.text!r})"
