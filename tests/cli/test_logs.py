"""``azu up``'s logs stay bounded: each run's logs shift to name.1.log ... name.N.log at startup, and a log
over the size cap is copied and emptied in place while its process keeps writing to it."""

from __future__ import annotations

import subprocess
import sys

from azu.cli import logs
from tests.support import wait_for


def test_startup_rotation_keeps_the_last_n_runs(tmp_path):
    for run in range(1, 6):
        logs.rotate_all(tmp_path, keep=2)
        (tmp_path / "api.log").write_text(f"run {run}\n")
        (tmp_path / "worker-local-0.log").write_text(f"worker run {run}\n")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["api.1.log", "api.2.log", "api.log", "worker-local-0.1.log", "worker-local-0.2.log",
                     "worker-local-0.log"]
    assert (tmp_path / "api.log").read_text() == "run 5\n"
    assert (tmp_path / "api.1.log").read_text() == "run 4\n"
    assert (tmp_path / "api.2.log").read_text() == "run 3\n"
    assert (tmp_path / "worker-local-0.2.log").read_text() == "worker run 3\n"


def test_lowering_keep_drops_the_extra_old_files(tmp_path):
    for n in range(1, 6):
        (tmp_path / f"api.{n}.log").write_text(str(n))
    (tmp_path / "api.log").write_text("now")
    logs.rotate_all(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["api.1.log"]
    assert (tmp_path / "api.1.log").read_text() == "now"


def test_empty_logs_are_not_rotated_and_keep_zero_keeps_none(tmp_path):
    (tmp_path / "empty.log").write_text("")
    (tmp_path / "full.log").write_text("x")
    logs.rotate_all(tmp_path, keep=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.log"]


def test_cap_rotates_a_log_its_running_process_keeps_writing(tmp_path):
    """A real child writing to its log through stdout (as azu up's children do): after the cap copies and
    truncates the file, the child's next line lands at the start of the emptied file (O_APPEND), not past
    a hole at its old offset."""
    path = tmp_path / "api.log"
    script = ("import sys\nfor line in sys.stdin:\n    sys.stdout.write('x' * int(line) + '\\n')\n"
              "    sys.stdout.flush()\n")
    with open(path, "ab") as out:
        child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=out, text=True)
    try:
        assert child.stdin is not None
        child.stdin.write("1000\n")
        child.stdin.flush()
        wait_for(lambda: path.stat().st_size == 1001, timeout=30, what="the child's first line")
        assert logs.cap(tmp_path, max_bytes=2000, keep=3) == []  # under the cap: untouched
        assert logs.cap(tmp_path, max_bytes=500, keep=3) == [path]
        assert (tmp_path / "api.1.log").stat().st_size == 1001
        assert path.stat().st_size == 0
        child.stdin.write("10\n")
        child.stdin.flush()
        wait_for(lambda: path.stat().st_size > 0, timeout=30, what="the child's second line")
        assert path.read_text() == "x" * 10 + "\n"
        assert logs.cap(tmp_path, max_bytes=0, keep=3) == []  # 0: no cap
    finally:
        child.stdin.close()
        child.wait(timeout=30)
