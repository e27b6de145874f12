"""Ctrl-C as an impatient user presses it: at start-up, and twice in a row during a run."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cli_argv, cli_env

# A finder that fails the import of the CLI as a Ctrl-C during start-up would.
INTERRUPTED_IMPORT = """
import sys
import imagepipe.entry

class Interrupt:
    def find_spec(self, name, path, target=None):
        if name == "imagepipe.cli":
            raise KeyboardInterrupt

sys.meta_path.insert(0, Interrupt())
imagepipe.entry.main()
"""


def test_ctrl_c_while_importing_is_exit_130_without_a_traceback(db_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", INTERRUPTED_IMPORT],
        env=cli_env(db_path),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 130
    assert done.stderr == "error: interrupted by SIGINT\n"


def test_the_console_script_and_python_m_use_the_entry_module() -> None:
    import tomllib

    root = Path(__file__).parent.parent
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"imagepipe": "imagepipe.entry:main"}
    assert "from imagepipe.entry import main" in (root / "imagepipe/__main__.py").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.3])
def test_two_ctrl_c_in_a_row_exit_130_at_once_and_leave_a_resumable_run(
    tmp_path: Path, delay: float
) -> None:
    # Every attempt hangs: the run cannot end by itself, so exiting at all (not when a
    # clock says) shows that the Ctrl-C stopped the attempts rather than waited for them.
    db = tmp_path / "s.db"
    env = cli_env(db, IMAGEPIPE_TIME_SCALE="1")
    proc = subprocess.Popen(
        cli_argv("run", "x", "-o", "hang_rate", "1", "-n", "50", "--id", "s"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("Started run s")  # executing now
        time.sleep(delay)  # the moment of the run is what this test varies
        proc.send_signal(signal.SIGINT)
        time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert (
        err == "error: interrupted by SIGINT: run 's' is saved. Resume with: imagepipe resume s\n"
    )
    resumed = subprocess.run(
        cli_argv("resume", "s", "--json", "--sim-latency", "0"),
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert '"state": "resolved"' in resumed.stdout
