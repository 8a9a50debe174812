"""Progress off a terminal: a few plain lines, never a bar's carriage returns."""
import io

from rocket.progress import Lines, progress_bar


def test_lines_print_at_intervals_and_at_the_end():
    out = io.StringIO()
    bar = Lines(total=1000, desc="scoring", unit="pair", interval=0.0, file=out)
    for _ in range(3):
        bar.update(250)
    bar.set_postfix(loss="0.12")
    bar.close()
    bar.close()  # idempotent
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 4
    assert lines[0].startswith("scoring: 250/1000 pair (25%) in ") and lines[-1].endswith(", loss=0.12")


def test_lines_stay_quiet_between_intervals_and_when_disabled():
    out = io.StringIO()
    items = list(Lines(range(5000), desc="x", interval=3600, file=out))
    assert items == list(range(5000)) and out.getvalue().count("\n") == 1   # the final line only
    quiet = io.StringIO()
    with Lines(total=3, disable=True, file=quiet) as bar:
        bar.update(3)
    assert quiet.getvalue() == ""


def test_progress_bar_is_plain_lines_when_stderr_is_not_a_terminal(capsys):
    # pytest captures stderr: not a terminal, as in CI or a redirected log
    assert isinstance(progress_bar(total=2, desc="d"), Lines)
