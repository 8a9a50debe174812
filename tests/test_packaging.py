"""The installed package as a user meets it: no name of this repository hides an installed
distribution when run from the checkout, and the extension imports on its own."""
import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def importable_top_level_names(root: Path) -> set[str]:
    """Names that `import NAME` finds in `root` when it is on sys.path (as the checkout is under
    `python -m`): regular packages and modules. A directory without `__init__.py` is only a
    namespace portion, which never wins over an installed package of the same name."""
    names = set()
    for entry in root.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and (entry / "__init__.py").is_file():
            names.add(entry.name)
        elif entry.is_file() and entry.suffix in (".py", ".so", ".pyd"):
            names.add(entry.name.split(".")[0])
    return names


def shadowed(root: Path, own: str = "rocket") -> dict[str, list[str]]:
    """Top-level names of `root` that some installed distribution other than `own` provides."""
    provided = importlib.metadata.packages_distributions()
    clashes = {}
    for name in sorted(importable_top_level_names(root)):
        others = [d for d in provided.get(name, []) if d.lower() != own]
        if others:
            clashes[name] = others
    return clashes


def test_no_top_level_name_shadows_an_installed_distribution():
    clashes = shadowed(ROOT)
    assert not clashes, f"top-level names of the repository hide installed distributions: {clashes}"


def test_shadow_check_finds_a_clash(tmp_path):
    """The check itself sees a package or module named like an installed distribution."""
    (tmp_path / "pytest").mkdir()
    (tmp_path / "pytest" / "__init__.py").write_text("")
    (tmp_path / "torch.py").write_text("")
    (tmp_path / "not_a_package").mkdir()  # namespace portion: no clash even if a dist had the name
    assert set(shadowed(tmp_path)) == {"pytest", "torch"}


def test_installed_kernels_package_wins_from_the_checkout():
    """From the repository root (as `python -m pytest` or `python -m rocket.cli` run), the PyPI
    `kernels` package that transformers imports is the one found, when it is installed."""
    code = ("import importlib.util, sys\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "print(spec.origin if spec else '')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    origin = out.stdout.strip()
    assert not origin or not Path(origin).resolve().is_relative_to(ROOT / "kernels"), origin


def test_extension_imports_on_its_own():
    """`import rocket._C` in a fresh interpreter, with nothing imported before it."""
    out = subprocess.run([sys.executable, "-c", "import rocket._C as C; print(C.__file__)"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr.strip().splitlines()[-1:]
