"""docs/api.md documents the whole public surface: every name in mla_cupy.__all__, the public
names of mla_cupy.reference, mla_cupy.testing, mla_cupy.selftest and mla_cupy.torch_ops, and
every MLA_CUPY_* variable _env.py reads."""

import ast
import pathlib
import re

import pytest

import mla_cupy
import mla_cupy.reference
import mla_cupy.testing

pytestmark = pytest.mark.cpu

ROOT = pathlib.Path(__file__).resolve().parent.parent
API = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")


def headings():
    return set(re.findall(r"^#+ `?([^`\n]+?)`?$", API, re.M))


@pytest.mark.parametrize("name", mla_cupy.__all__)
def test_every_public_name_is_documented(name):
    assert f"`{name}`" in API, f"docs/api.md does not mention `{name}`"
    assert name in headings(), f"docs/api.md has no section for {name}"


@pytest.mark.parametrize("name", mla_cupy.__all__)
def test_public_callables_show_their_signature(name):
    obj = getattr(mla_cupy, name)
    if not callable(obj) or isinstance(obj, type):
        return
    assert f"mla_cupy.{name}(" in API, f"docs/api.md shows no signature of mla_cupy.{name}"


@pytest.mark.parametrize("module", [mla_cupy.reference, mla_cupy.testing], ids=lambda m: m.__name__)
def test_helper_modules_are_documented(module):
    assert module.__name__ in headings()
    missing = [name for name in module.__all__ if f"`{name}`" not in API and f".{name}(" not in API]
    assert not missing, f"docs/api.md does not document {module.__name__}: {missing}"


def test_every_environment_variable_is_documented():
    source = (ROOT / "mla_cupy" / "_env.py").read_text(encoding="utf-8")
    code = source.split('"""', 2)[2]  # everything after the module docstring
    read = sorted(set(re.findall(r'"(MLA_CUPY_[A-Z0-9_]+)"', code)))
    assert read, "expected _env.py to read MLA_CUPY_* variables"
    missing = [name for name in read if f"`{name}`" not in API]
    assert not missing, f"docs/api.md does not document {missing}"


def _declared_all(module_name):
    """A module's ``__all__``, read from its source (mla_cupy.torch_ops cannot be imported
    without torch)."""
    path = ROOT / "mla_cupy" / f"{module_name.split('.')[-1]}.py"
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{path} declares no __all__")


@pytest.mark.parametrize("module_name", ["mla_cupy.selftest", "mla_cupy.torch_ops"])
def test_selftest_and_torch_ops_are_documented(module_name):
    assert module_name in headings()
    names = _declared_all(module_name)
    assert names
    missing = [name for name in names
               if f"`{name}`" not in API and f".{name}(" not in API and f".{name}`" not in API]
    assert not missing, f"docs/api.md does not document {module_name}: {missing}"
