"""One exception tree: every public exception chaoqing raises is defined in chaoqing.errors and
has its own row in the one table that maps it to HTTP; anything else is a generic 500."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from chaoqing import errors

SOURCE_ROOT = Path(__file__).resolve().parents[1] / "src" / "chaoqing"
EXCEPTION_BASES = {"Exception", "BaseException", "ValueError", "RuntimeError", "OSError", "KeyError", "TypeError"}


def _exception_classes_outside_errors() -> list[str]:
    """Public classes whose bases name an exception, in every module but errors.py."""
    error_names = {name for name, value in vars(errors).items() if inspect.isclass(value)
                   and issubclass(value, BaseException)}
    found = []
    for path in SOURCE_ROOT.rglob("*.py"):
        if path.name == "errors.py" and path.parent == SOURCE_ROOT:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ClassDef) or node.name.startswith("_"):
                continue
            bases = {base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else ""
                     for base in node.bases}
            if bases & (EXCEPTION_BASES | error_names) or node.name.endswith(("Error", "Exception")):
                found.append(f"{path.relative_to(SOURCE_ROOT)}:{node.lineno} {node.name}")
    return found


def test_every_public_exception_lives_in_errors_py() -> None:
    assert _exception_classes_outside_errors() == []


def test_every_error_in_the_tree_has_its_own_row_in_the_table() -> None:
    tree = [value for name in errors.__all__ if inspect.isclass(value := getattr(errors, name))
            and issubclass(value, errors.ChaoqingError) and value is not errors.ChaoqingError]
    assert len(tree) >= 25
    missing = [klass.__name__ for klass in tree if klass not in errors.HTTP_ERRORS]
    assert missing == []
    drawing = errors.__doc__ or ""
    for klass in tree:  # the docstring's drawing names every one, with its status and code
        row = errors.HTTP_ERRORS[klass]
        assert f"{klass.__name__} " in drawing, klass.__name__
        assert 400 <= row.status < 600 and row.code


def test_the_errors_that_invite_a_retry_say_when() -> None:
    assert errors.retry_after_for(errors.ShuttingDown("stopping", retry_after_s=2.0)) == 2.0
    assert errors.retry_after_for(errors.Overloaded("busy")) == 1.0
    assert errors.retry_after_for(errors.ModelUnavailable("down")) == 1.0
    assert errors.retry_after_for(errors.BadModelResponse("garbage")) is None


def test_anything_outside_the_table_is_a_generic_500() -> None:
    assert errors.http_error_for(RuntimeError("secret detail")) == errors.HttpError(500, "internal_error")
    assert errors.http_error_for(errors.ChaoqingError("unplanned")) == errors.HttpError(500, "internal_error")
    assert errors.http_error_for(errors.ShuttingDown("stopping")) == errors.HttpError(503, "shutting_down")
    assert errors.http_error_for(errors.ConfigError("bad")) == errors.HttpError(500, "config_error")
