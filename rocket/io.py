"""Atomic writes, the one way rocket writes an output: a file (or a group of files, atomic_paths)
appears whole or not at all; and the one way it reads a text or JSON input: UTF-8 (a leading BOM
accepted), errors naming the line.

The data goes to a unique temporary file beside the target (two writers never share one), which
is flushed to disk and renamed over the target; the directory is then synced so the rename itself
survives a crash. On any failure the temporary file is removed and the old target is untouched.
"""
from __future__ import annotations

import json
import os
import secrets
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


def _temp_beside(path: Path) -> Path:
    """A new, unique, empty temporary file in `path`'s directory (created if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(name)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path to write `path`'s content to (by any writer, e.g. a library's
    save function); on a clean exit the file is synced and renamed to `path`."""
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


_COMMIT = ".rocket-commit-"  # prefix of a commit record: the renames of one atomic_paths group


@contextmanager
def atomic_paths(paths) -> Iterator[list[Path]]:
    """Several outputs that appear together or not at all: yields one temporary path per target, to
    write as atomic_path's. On a clean exit every temporary file is synced, then a commit record
    listing the renames is written (synced) beside each target, then the renames happen. A crash in
    the middle of the renames is completed by whoever next reads or writes one of those directories
    (`recover`; read_text calls it), so readers never see half of the group. On a failure before the
    commit record the temporary files are removed and the old targets are untouched."""
    targets = [Path(p).absolute() for p in paths]
    temps: list[Path] = []
    try:
        for target in targets:
            recover(target.parent)
            temps.append(_temp_beside(target))
        yield list(temps)
        for tmp in temps:
            _fsync_file(tmp)
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise
    dirs = sorted({t.parent for t in targets})
    tag = f"{_COMMIT}{secrets.token_hex(8)}.json"
    record = {"renames": [[str(t), str(p)] for t, p in zip(temps, targets)], "records": [str(d / tag) for d in dirs]}
    for d in dirs:
        write_json(d / tag, record)
    _complete(record)


def _complete(record: dict) -> None:
    """Finish one commit: every temporary file still present is renamed over its target, then the
    directories are synced and the commit records removed (all steps repeatable after a crash)."""
    for tmp, target in record["renames"]:
        if os.path.exists(tmp):
            os.replace(tmp, target)
    for d in {Path(t).parent for _, t in record["renames"]}:
        _fsync_dir(d)
    for path in record["records"]:
        Path(path).unlink(missing_ok=True)


def recover(directory: str | os.PathLike) -> None:
    """Complete the atomic_paths commits a crash interrupted whose record is in `directory`."""
    try:
        records = [e.path for e in os.scandir(directory) if e.name.startswith(_COMMIT) and e.name.endswith(".json")]
    except OSError:
        return
    for path in records:
        try:
            _complete(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # unreadable here (a read-only directory, a record being written): left for a writer


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
    recover(path.parent)  # a group of outputs (atomic_paths) is read whole, never half-renamed
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
