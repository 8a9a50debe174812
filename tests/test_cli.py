import subprocess
import sys

from rocket.cli import COMMANDS


def test_help_lists_every_stage():
    out = subprocess.run([sys.executable, "-m", "rocket.cli", "--help"], capture_output=True, text=True, check=True)
    for name in ("score", "select", "augment", "train", "run", "demo"):
        assert name in COMMANDS and name in out.stdout
