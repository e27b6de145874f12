"""The provider contract through the real CLI: a plugin written from docs/guides/plugins.md
alone, installed as its own distribution with an entry point, runs; one lacking a member
is one line and exit 2, and nothing is written."""

from __future__ import annotations

import json
import re
import subprocess
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from conftest import cli_argv, cli_env

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "guides" / "plugins.md"


def _guide_example() -> str:
    """The guide's one Python block: the whole provider."""
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.DOTALL)
    assert len(blocks) == 1, "docs/guides/plugins.md should hold exactly one Python example"
    return str(blocks[0])


def install_plugin(site: Path, target: str, extra: str = "") -> None:
    """A real installed distribution, imagepipe-inkjet: the guide's example as package
    ``imagepipe_inkjet`` (plus ``extra`` code), a dist-info directory whose entry point
    ``inkjet`` is ``target``; ``site`` goes on the subprocess's PYTHONPATH."""
    package = site / "imagepipe_inkjet"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(_guide_example() + textwrap.dedent(extra))
    info = site / "imagepipe_inkjet-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: imagepipe-inkjet\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[imagepipe.providers]\ninkjet = {target}\n")


def imagepipe(
    site: Path, db: Path, *args: str, key: str | None = "ink-key"
) -> subprocess.CompletedProcess[str]:
    env = cli_env(db, PYTHONPATH=str(site), IMAGEPIPE_TIME_SCALE="0.01")
    env.pop("INKJET_KEY", None)
    if key is not None:
        env["INKJET_KEY"] = key
    return subprocess.run(
        cli_argv(*args), env=env, capture_output=True, text=True, timeout=60, cwd=site.parent
    )


def test_a_plugin_written_from_the_guide_runs(tmp_path: Path) -> None:
    site, db = tmp_path / "site", tmp_path / "runs.db"
    install_plugin(site, "imagepipe_inkjet:Inkjet")

    listed = imagepipe(site, db, "providers", "--json")
    assert listed.returncode == 0, listed.stderr
    infos = {info["name"]: info for info in json.loads(listed.stdout)}
    assert list(infos) == ["simulated", "openai", "replicate", "inkjet"]
    assert infos["inkjet"]["plugin"] == "imagepipe-inkjet"
    assert infos["inkjet"]["default_concurrency"] == 2

    args = ("run", "a lighthouse", "-p", "inkjet", "-o", "colour", "red", "--style", "cartoon")
    # its check_credentials runs first: without its key, one line, exit 2, nothing written
    no_key = imagepipe(site, db, *args, "--id", "ink1", key=None)
    assert (no_key.returncode, no_key.stderr) == (
        2,
        "error: no API key: set INKJET_KEY (this provider reads its key from it)\n",
    )
    assert not db.exists()

    done = imagepipe(site, db, *args, "--id", "ink1", "--json")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    result = json.loads(done.stdout)
    assert result["state"] == "resolved"
    (image,) = result["images"]
    with Image.open(image["path"]) as png:  # drawn with the run's -o colour red
        assert (png.format, png.getpixel((0, 0))) == ("PNG", (255, 0, 0))
    # resumed, the settled run replays without calling the plugin again
    again = imagepipe(site, db, "resume", "ink1", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["images"][0]["replayed"] is True


REFUSING = """

from imagepipe.providers import CredentialsError


class InkKeyRefused(CredentialsError):
    \"\"\"The plugin's own error for a key its service refuses.\"\"\"


class RefusingInkjet(Inkjet):
    async def generate(self, request, steps):
        raise InkKeyRefused("the ink service refused the key", fix="check INK_KEY")
"""


def test_a_plugins_own_credentials_error_stops_the_run_by_its_class(tmp_path: Path) -> None:
    """A plugin's CredentialsError subclass (a name of its own, not "AuthenticationFailed")
    is an account error by its class: the run stops (exit 78), its branches pending, and
    the line names what the plugin says to fix."""
    site, db = tmp_path / "site", tmp_path / "runs.db"
    install_plugin(site, "imagepipe_inkjet:RefusingInkjet", REFUSING)
    proc = imagepipe(site, db, "run", "a lighthouse", "-p", "inkjet", "--id", "r1", "--json")
    assert proc.returncode == 78, proc.stderr
    assert proc.stderr == (
        "error: run 'r1' stopped, its unfinished branches pending: the ink service refused "
        "the key (check INK_KEY); fix it, then `imagepipe resume r1`\n"
    )
    shown = imagepipe(site, db, "show", "r1", "--json")
    assert {b["state"] for b in json.loads(shown.stdout)["branches"]} == {"pending"}


def _without(member: str) -> str:
    return f"""

Broken = type(
    "Inkjet", (), {{k: v for k, v in vars(Inkjet).items() if k != {member!r}}}
)
"""


@pytest.mark.parametrize(
    ("member", "what_to_add"),
    [
        (
            "check_credentials",
            "a static method check_credentials(options) that raises MissingCredentials "
            "when the key is not set",
        ),
        ("generate", "a method async def generate(self, request, steps) -> ProviderImage"),
        ("aclose", "a method async def aclose(self) -> None, called once when the run ends"),
        ("create", "a class method create(cls, options, settings) that returns the run's"),
        ("guarantee", "a class attribute guarantee = '<e.g. at least once>'"),
    ],
)
def test_a_plugin_lacking_a_member_is_one_line_exit_2_and_writes_nothing(
    tmp_path: Path, member: str, what_to_add: str
) -> None:
    site, db = tmp_path / "site", tmp_path / "runs.db"
    install_plugin(site, "imagepipe_inkjet:Broken", _without(member))
    proc = imagepipe(site, db, "run", "a lighthouse", "-p", "inkjet", "--id", "b1")
    assert proc.returncode == 2, proc.stderr
    line = (
        f"error: provider 'inkjet' (from imagepipe-inkjet): class Inkjet lacks {member}; "
        f"add {what_to_add}"
    )
    assert proc.stderr.startswith(line)
    assert proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert not db.exists()


def test_providers_names_a_plugin_lacking_a_member_in_one_line(tmp_path: Path) -> None:
    site, db = tmp_path / "site", tmp_path / "runs.db"
    install_plugin(site, "imagepipe_inkjet:Broken", _without("generate"))
    proc = imagepipe(site, db, "providers", "--json")
    assert proc.returncode == 0, proc.stderr
    names = [info["name"] for info in json.loads(proc.stdout)]
    assert names == ["simulated", "openai", "replicate"]
    assert proc.stderr == (
        "warning: provider 'inkjet' (from imagepipe-inkjet): class Inkjet lacks generate; "
        "add a method async def generate(self, request, steps) -> ProviderImage\n"
    )
