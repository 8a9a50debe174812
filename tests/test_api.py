"""The lazily imported public API of `rocket`: every advertised name resolves to its module's object."""
import subprocess
import sys
from importlib import import_module

import pytest

import rocket


NAMESAKES = ("train", "dedup")  # stage modules named like their function (DESIGN §4)


@pytest.mark.parametrize("name", sorted(set(rocket.__all__) - set(NAMESAKES)))
def test_public_name_resolves_to_its_module_object(name):
    assert getattr(rocket, name) is getattr(import_module(rocket._API[name]), name)


@pytest.mark.parametrize("first", ["function", "module"])
@pytest.mark.parametrize("name", NAMESAKES)
def test_namesake_calls_the_function_whichever_is_imported_first(name, first):
    # Importing the module rocket.<name> binds the package attribute to the module; calling it must
    # still reach the function (a call without arguments names the function in its TypeError).
    head = f"from rocket import {name} as f" if first == "function" else f"import rocket.{name} as f"
    code = f"""{head}
import rocket
from rocket import {name}
for g in (f, rocket.{name}, {name}):
    try:
        g()
    except TypeError as e:
        assert "{name}() missing" in str(e), e
    else:
        raise AssertionError("no TypeError")
print("ok")"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
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
