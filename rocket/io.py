"""Atomic writes, the one way rocket writes an output: a file appears whole or not at all; and
the one way it reads a text or JSON input: UTF-8 (a leading BOM accepted), errors naming the line.

The data goes to a unique temporary file beside the target (two writers never share one), which
is flushed to disk and renamed over the target; the directory is then synced so the rename itself
survives a crash. On any failure the temporary file is removed and the old target is untouched.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rocket.errors import RocketError


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path to write `path`'s content to (by any writer, e.g. a library's
    save function); on a clean exit the file is synced and renamed to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write bytes, or text as UTF-8, to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def write_json(path: str | os.PathLike, obj, indent: int = 1) -> Path:
    """`obj` as JSON, written atomically."""
    return atomic_write(path, json.dumps(obj, indent=indent, default=str) + "\n")


def check_paths(inputs: dict[str, object], outputs: dict[str, object],
                error: type[RocketError] = RocketError) -> None:
    """Before any work: no output may be the same file as another output or as an input (resolved
    paths, so `a/../b` and symlinks count). Keys are what the user typed (e.g. '--out'); None
    values are skipped. A collision raises `error` naming both."""
    seen: dict[Path, str] = {}
    for kind, paths in (("input", inputs), ("output", outputs)):
        for flag, path in paths.items():
            if path is None:
                continue
            resolved = Path(path).resolve()
            if resolved in seen and (kind == "output"):
                raise error(f"{flag} {path}: the same file as {seen[resolved]}; it would be overwritten")
            seen.setdefault(resolved, flag)


def read_text(path: str | os.PathLike, error: type[RocketError] = RocketError) -> str:
    """A file's UTF-8 text, a leading byte-order mark (common on Windows) dropped. Bytes that are
    not UTF-8 raise `error` naming the file and line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, expected a file") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise error(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x})") from None


def read_json(path: str | os.PathLike, error: type[RocketError] = RocketError):
    """A JSON file (see read_text); malformed JSON raises `error` naming the file and line."""
    try:
        return json.loads(read_text(path, error))
    except json.JSONDecodeError as e:
        raise error(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
