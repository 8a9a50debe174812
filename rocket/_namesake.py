"""Stage modules named like their main function (DESIGN §4: `rocket.train`, `rocket.dedup`).

Importing `rocket.train` binds the package attribute `rocket.train` to the module, hiding the
function of the same name; so the module itself is made callable and calls the function.
"""
import sys
import types


def make_module_callable(module_name: str, func) -> None:
    class _Namesake(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return func(*args, **kwargs)

    _Namesake.__call__.__doc__ = func.__doc__
    sys.modules[module_name].__class__ = _Namesake
