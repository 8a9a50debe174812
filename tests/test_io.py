"""rocket.io: atomic single and grouped writes (a real SIGKILL between the renames of a group),
and the readers' UTF-8 rules."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rocket.errors import RocketError
from rocket.io import atomic_paths, atomic_write, read_json, read_text, recover


def _leftovers(*dirs: Path) -> list[str]:
    return sorted(p.name for d in dirs for p in d.iterdir() if p.name.startswith("."))


def test_group_is_written_whole_with_nothing_left_beside_it(tmp_path):
    other = tmp_path / "other"
    targets = [tmp_path / "a.txt", tmp_path / "b.json", other / "c.png"]
    with atomic_paths(targets) as temps:
        assert len(set(temps)) == 3 and all(t.parent == p.parent for t, p in zip(temps, targets))
        for i, t in enumerate(temps):
            t.write_text(f"new {i}")
    assert [p.read_text() for p in targets] == ["new 0", "new 1", "new 2"]
    assert _leftovers(tmp_path, other) == []


def test_a_failed_write_leaves_every_old_target_untouched(tmp_path):
    targets = [tmp_path / "a.txt", tmp_path / "b.txt"]
    for p in targets:
        p.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_paths(targets) as temps:
        temps[0].write_text("new")
        raise RuntimeError("disk full")
    assert [p.read_text() for p in targets] == ["old", "old"]
    assert _leftovers(tmp_path) == []


CRASH = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import rocket.io as io
    done = []
    real = os.replace
    def replace(src, dst):  # dies after the group's two commit records and its first rename
        if len(done) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst)
        done.append(dst)
    targets = [Path(a) for a in sys.argv[1:]]
    with io.atomic_paths(targets) as temps:
        for t in temps:
            t.write_text("new")
        io.os.replace = replace
""")


def test_a_crash_between_the_renames_is_completed_by_the_next_reader(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    targets = [tmp_path / "experts.txt", tmp_path / "experts.json", other / "similarity.png"]
    for p in targets:
        p.write_text("old")
    proc = subprocess.run([sys.executable, "-c", CRASH, *map(str, targets)], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert sorted(p.read_text() for p in targets) == ["new", "old", "old"]  # half renamed when it died
    assert read_text(other / "similarity.png") == "new"  # reading one completes the whole group
    assert [p.read_text() for p in targets] == ["new", "new", "new"]
    assert _leftovers(tmp_path, other) == []
    recover(tmp_path)  # nothing left to do: repeatable


def test_atomic_write_replaces_whole(tmp_path):
    path = tmp_path / "x.json"
    atomic_write(path, "old")
    atomic_write(path, b'{"a": 1}')
    assert read_json(path) == {"a": 1} and _leftovers(tmp_path) == []


def test_readers_name_the_file_and_line(tmp_path):
    path = tmp_path / "x.json"
    path.write_bytes(b'\xef\xbb\xbf{\n"a": 1,\n}')
    with pytest.raises(RocketError, match=r"x.json:3: malformed JSON"):
        read_json(path)
    path.write_bytes(b"ok\n\xff")
    with pytest.raises(RocketError, match=r"x.json:2: not UTF-8 text \(byte 0xff\)"):
        read_text(path)
