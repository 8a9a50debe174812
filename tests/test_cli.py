import subprocess
import sys

from rocket.cli import COMMANDS


def test_help_lists_every_stage():
    out = subprocess.run([sys.executable, "-m", "rocket.cli", "--help"], capture_output=True, text=True, check=True)
    for name in ("score", "select", "augment", "train", "run", "demo"):
        assert name in COMMANDS and name in out.stdout


def test_no_progress_also_silences_the_libraries_bars(tmp_path, capsys):
    import transformers
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars

    from rocket.cli import main

    try:
        code = main(["augment", "--pool", str(tmp_path / "missing.jsonl"), "--kshot", str(tmp_path / "k.jsonl"),
                     "--out", str(tmp_path / "o.jsonl"), "--no-progress"])
        assert code == 2 and "no such file" in capsys.readouterr().err
        assert not transformers.utils.logging.is_progress_bar_enabled() and are_progress_bars_disabled()
    finally:
        transformers.utils.logging.enable_progress_bar()
        enable_progress_bars()
