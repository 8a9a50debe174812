"""The lazily imported public API of `rocket`: every advertised name resolves to its module's object."""
import subprocess
import sys
import types
from importlib import import_module

import pytest

import rocket


@pytest.mark.parametrize("name", sorted(rocket.__all__))
def test_public_name_resolves_to_its_module_object(name):
    value = getattr(rocket, name)
    assert value is getattr(import_module(rocket._API[name]), name)
    assert not isinstance(value, types.ModuleType), f"rocket.{name} is a module"


@pytest.mark.parametrize("name", ["train", "dedup"])
def test_function_names_stay_functions_after_any_submodule_import(name):
    # No module of the package is named like a public function, so importing every subpackage
    # leaves rocket.train / rocket.dedup the functions.
    code = f"""import pkgutil, importlib, rocket
for m in pkgutil.walk_packages(rocket.__path__, 'rocket.'):
    if m.name.endswith(('.cli', 'demo')) or '.kernels' in m.name:
        continue
    importlib.import_module(m.name)
from rocket import {name}
assert callable({name}) and not hasattr({name}, '__path__'), {name}
print("ok")"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        rocket.nope


def test_import_is_cheap():
    # The stages' heavy dependencies load only when a name that needs them is used.
    code = "import sys, rocket; print(sorted(m for m in ('deepspeed', 'faiss', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
