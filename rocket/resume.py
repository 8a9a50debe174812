"""What makes a stage's output reusable: fingerprints of input files, digests of options, stamps."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from rocket.io import write_json
from rocket.errors import RocketError


STAMP_DIR = ".rocket"


# --------------------------------------------------------------------------- stamps
def fingerprint(path: str | Path) -> list:
    """Cheap identity of an input file or directory: relative name, size and mtime of every file."""
    path = Path(path)
    if path.is_file():
        st = path.stat()
        return [[path.name, st.st_size, st.st_mtime_ns]]
    if path.is_dir():
        out = []
        for p in sorted(path.rglob("*")):
            if p.is_file():
                st = p.stat()
                out.append([str(p.relative_to(path)), st.st_size, st.st_mtime_ns])
        return out
    raise RocketError(f"{path}: no such file or directory")


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Stamps:
    """The stamps of one run directory."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir / STAMP_DIR

    def path(self, stage: str) -> Path:
        return self.dir / f"{stage}.json"

    def read(self, stage: str) -> dict | None:
        try:
            return json.loads(self.path(stage).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def clear(self, stage: str) -> None:
        self.path(stage).unlink(missing_ok=True)

    def write(self, stage: str, key: str, outputs: list[str], seconds: float, summary: dict) -> None:
        write_json(self.path(stage), {"stage": stage, "key": key, "outputs": outputs, "seconds": seconds,
                                      "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                      "summary": summary})
