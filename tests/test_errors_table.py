"""errors.py maps the core's statuses without importing the bindings."""

import ast
import pathlib

import pytest

import thunderlink.errors as errors
from thunderlink.bindings import ffi, lib


def test_errors_does_not_import_the_bindings():
    tree = ast.parse(pathlib.Path(errors.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert "bindings" not in (node.module or ""), node.module
        elif isinstance(node, ast.Import):
            assert not any("bindings" in a.name for a in node.names)


def test_every_status_has_its_class():
    names = {n[len("TL_ERR_"):] for n in dir(lib) if n.startswith("TL_ERR_")}
    assert names == set(errors._BY_NAME)
    for name, cls in errors._BY_NAME.items():
        rc = getattr(lib, "TL_ERR_" + name)
        with pytest.raises(cls) as e:
            errors.check(rc)
        assert e.value.status == rc
        assert e.value.args[0] == "[thunderlink] " + ffi.string(lib.tl_strerror(rc)).decode()


def test_check_passes_non_errors_through():
    assert errors.check(0) == 0
    assert errors.check(7, ffi.NULL) == 7
