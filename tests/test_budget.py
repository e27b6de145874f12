"""Issue 21, the durable budget: --max-cost and --max-images through the real CLI, against
the loopback OpenAI fake (gpt-image-1 at low quality: $0.011 an image published, about
$0.0116 reserved at worst with its prompt), counted at the fake."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import subprocess
import threading
from pathlib import Path

import pytest

from tests.fakes.common import Fault
from tests.fakes.openai_server import OpenAIFake
from tests.fakes.replicate_server import ReplicateFake

from conftest import cli_argv, cli_env
from storeview import checkpointed_bytes

pytest_plugins = ["tests.fakes.plugin"]

LOW = ("-o", "quality", "low", "-o", "size", "1024x1024")


@pytest.fixture(autouse=True)
def no_user_prices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("IMAGEPIPE_PRICES", raising=False)


def imagepipe(db: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_argv(*args), env=cli_env(db), capture_output=True, text=True, timeout=timeout
    )


def run_args(run_id: str, out: Path, *extra: str) -> list[str]:
    return ["run", "a lighthouse", "-p", "openai", *LOW, "-n", "2", "--id", run_id,
            "--out", str(out), *extra]  # fmt: skip


def states(db: Path, run_id: str) -> dict[str, int]:
    shown = imagepipe(db, "show", run_id, "--json")
    assert shown.returncode == 0, shown.stderr
    counts: dict[str, int] = {}
    for branch in json.loads(shown.stdout)["branches"]:
        counts[branch["state"]] = counts.get(branch["state"], 0) + 1
    return counts


def test_a_cap_that_fits_k_images_makes_exactly_k_paid_requests_then_resume_goes_on(
    openai_fake: OpenAIFake, db_path: Path, tmp_path: Path
) -> None:
    """$0.03 fits two images (each reserved at ~$0.0116, then costs ~$0.0109), not three."""
    capped = imagepipe(db_path, *run_args("cap", tmp_path / "img", "--max-cost", "0.03", "-c", "1"))
    assert capped.returncode == 3, capped.stderr
    assert capped.stderr.count("\n") == 1
    assert capped.stderr.startswith("error: budget reached: $0.02")
    assert "spent of $0.0300; imagepipe resume cap --max-cost 0.07 goes on" in capped.stderr
    assert openai_fake.paid_creates == 2
    assert states(db_path, "cap") == {"resolved": 2, "pending": 4}

    again = imagepipe(db_path, "resume", "cap", "--max-cost", "0.07")
    assert again.returncode == 0, again.stderr
    assert openai_fake.paid_creates == 6, "the 4 left, and nothing paid twice"
    assert states(db_path, "cap") == {"resolved": 6}


def test_an_image_cap_stops_at_n_images(
    openai_fake: OpenAIFake, db_path: Path, tmp_path: Path
) -> None:
    capped = imagepipe(db_path, *run_args("n3", tmp_path / "img", "--max-images", "3"))
    assert capped.returncode == 3, capped.stderr
    assert "image cap reached: 3 of 3 images made or paid for" in capped.stderr
    assert "imagepipe resume n3 --max-images 6 goes on" in capped.stderr
    assert openai_fake.paid_creates == 3
    assert states(db_path, "n3") == {"resolved": 3, "pending": 3}


def test_an_attempt_refused_by_the_provider_gives_its_reservation_back(
    openai_fake: OpenAIFake, db_path: Path, tmp_path: Path
) -> None:
    """Three 500s answered (not billed) then success: a cap of one image still makes it."""
    openai_fake.add_fault(Fault(status=500), times=3)
    done = imagepipe(
        db_path,
        "run", "a fox", "-p", "openai", *LOW, "-s", "cartoon", "--id", "one",
        "--out", str(tmp_path / "img"), "--max-images", "1", "--max-attempts", "5",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert openai_fake.paid_creates == 1


def test_a_killed_run_never_exceeds_its_cap_across_resumes(
    openai_fake: OpenAIFake, db_path: Path, tmp_path: Path
) -> None:
    """Two requests held at the fake, the process killed with them in flight: their outcome
    is unknown, so they stay counted at their worst case; the resume under the same cap
    (three worst cases, $0.0352) may start one more attempt, never more."""
    release = threading.Event()
    openai_fake.add_fault(Fault.held(release), times=2)
    args = run_args("k", tmp_path / "img", "--max-cost", "0.036", "-c", "2")
    proc = subprocess.Popen(cli_argv(*args), env=cli_env(db_path), text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        openai_fake.wait_for(lambda: openai_fake.requests["create"] == 2, timeout=120)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
    openai_fake.wait_idle(timeout=60)
    resumed = imagepipe(db_path, "resume", "k")
    assert resumed.returncode == 3, resumed.stderr
    # at most three creates in all, as the cap allows: the two killed in flight, one more
    assert openai_fake.requests["create"] == 3
    assert states(db_path, "k")["pending"] >= 3


@pytest.mark.parametrize(
    ("given", "said"),
    [
        ("-1", "--max-cost must be a number of US dollars, 0 or more"),
        ("nan", "--max-cost must be a number of US dollars, 0 or more"),
        ("five", "--max-cost must be a number of US dollars, 0 or more"),
        ("5 EUR", "--max-cost is in USD, not 'EUR'"),
        ("1_000", "--max-cost must be a number of US dollars, 0 or more"),
        ("\u0665", "--max-cost must be a number of US dollars, 0 or more"),
        ("\uff15", "--max-cost must be a number of US dollars, 0 or more"),
    ],
)
def test_a_bad_max_cost_is_one_line_and_writes_nothing(
    openai_fake: OpenAIFake, db_path: Path, tmp_path: Path, given: str, said: str
) -> None:
    done = imagepipe(db_path, *run_args("bad", tmp_path / "img", "--max-cost", given))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert said in done.stderr
    assert not db_path.exists()
    assert not (tmp_path / "img").exists()
    assert openai_fake.paid_creates == 0


def test_a_cost_cap_on_a_model_without_a_price_is_refused(
    openai_fake: OpenAIFake, db_path: Path, tmp_path: Path
) -> None:
    args = run_args("u", tmp_path / "img", "-o", "model", "gpt-image-9", "--max-cost", "5")
    done = imagepipe(db_path, *args)
    assert done.returncode == 2
    assert "--max-cost needs a price" in done.stderr
    assert "'gpt-image-9'" in done.stderr
    assert not db_path.exists()


def test_a_worker_takes_no_cap_of_its_own(db_path: Path) -> None:
    done = imagepipe(db_path, "worker", "--once", "--max-cost", "5")
    assert done.returncode == 2
    assert "--max-cost and --max-images are a run's" in done.stderr


def test_two_workers_on_postgresql_sharing_a_cap_never_exceed_it_together(
    openai_fake: OpenAIFake, postgres_url: str, tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    """12 branches, a cap of 5 images, two workers claiming at once: 5 paid creates in all,
    each worker stopping at the cap with its one line, the rest pending."""
    env = cli_env(tmp_path / "unused.db")
    env["IMAGEPIPE_DB"] = postgres_url
    detach = ["run", "a fox", "-p", "openai", *LOW, "-n", "4", "--id", "pg", "--out",
              str(tmp_path / "img"), "--max-images", "5", "--detach"]  # fmt: skip
    assert subprocess.run(cli_argv(*detach), env=env, timeout=120).returncode == 0
    workers = [
        subprocess.Popen(
            cli_argv("worker", "--once", "-c", "3"),
            env=env,
            text=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    procs.extend(workers)
    errors = [w.communicate(timeout=120)[1] for w in workers]
    assert [w.returncode for w in workers] == [3, 3], errors
    assert all("image cap reached: 5 of 5 images" in e for e in errors), errors
    assert openai_fake.paid_creates == 5
    shown = subprocess.run(cli_argv("show", "pg", "--json"), env=env, capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    counted = [b["state"] for b in json.loads(shown.stdout)["branches"]]
    assert (counted.count("resolved"), counted.count("pending")) == (5, 7)


@pytest.mark.parametrize(
    ("flag", "given", "said"),
    [
        ("--max-cost", "9999999999999999999999", "--max-cost must be at most 1000000000000"),
        ("--max-images", "99999999999999999999", "--max-images must be at most 10"),
    ],
)
def test_a_cap_too_large_for_the_store_is_one_line_and_writes_nothing(
    openai_fake: OpenAIFake, db_path: Path, tmp_path: Path, flag: str, given: str, said: str
) -> None:
    """Not a traceback from the store's 64-bit integers after the run was recorded."""
    done = imagepipe(db_path, *run_args("big", tmp_path / "img", flag, given))
    assert (done.returncode, done.stderr.count("\n")) == (2, 1), done.stderr
    assert said in done.stderr
    assert not db_path.exists()
    assert not (tmp_path / "img").exists()

    made = imagepipe(db_path, *run_args("big", tmp_path / "img", "--max-images", "0"))
    assert made.returncode == 3, made.stderr
    before = checkpointed_bytes(db_path)
    resumed = imagepipe(db_path, "resume", "big", flag, given)
    assert (resumed.returncode, resumed.stderr.count("\n")) == (2, 1), resumed.stderr
    assert said in resumed.stderr
    assert checkpointed_bytes(db_path) == before
    assert openai_fake.requests["create"] == 0


def spending_rows(db: Path) -> dict[str, tuple[int | None, int]]:
    with sqlite3.connect(db) as conn:
        found = conn.execute("SELECT meter, cap, spent FROM spending").fetchall()
    return {meter: (cap, spent) for meter, cap, spent in found}


def test_a_refused_key_gives_back_what_its_attempts_reserved(
    openai_fake: OpenAIFake, db_path: Path, tmp_path: Path
) -> None:
    """The provider answered 401: nothing was made or billed. A cap of exactly the run's
    images stays enough for the resume once the key is fixed (it made none: the drained
    attempts' reservations had stayed counted as made)."""
    args = run_args("key", tmp_path / "img", "-s", "cartoon", "-c", "2", "--max-images", "2")
    stopped = subprocess.run(
        cli_argv(*args), env=cli_env(db_path, OPENAI_API_KEY="sk-wrong"),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert stopped.returncode == 78, stopped.stderr
    assert spending_rows(db_path)["images"] == (2, 0)
    # nor does show count them among the attempts that may have been paid
    spent = json.loads(imagepipe(db_path, "show", "key", "--json").stdout)["cost"]["spent"]
    assert (spent["failed_attempts"], spent["failed_attempts_micro_usd"]) == (0, 0)

    resumed = imagepipe(db_path, "resume", "key")
    assert resumed.returncode == 0, resumed.stderr
    assert openai_fake.paid_creates == 2
    assert states(db_path, "key") == {"resolved": 2}


def test_a_base_url_that_refuses_connections_gives_back_what_was_reserved(
    openai_fake: OpenAIFake, db_path: Path, tmp_path: Path
) -> None:
    """A connection refused sent nothing: it is not counted as paid, so the run stopped on
    an unreachable base URL finishes under the same cap once the URL is fixed."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as refusing:
        refusing.bind(("127.0.0.1", 0))  # bound, not listening: every connection refused
        url = f"http://127.0.0.1:{refusing.getsockname()[1]}/v1"
        args = run_args("url", tmp_path / "img", "-s", "cartoon", "-c", "2",
                        "--max-images", "2", "-o", "base_url", url)  # fmt: skip
        stopped = imagepipe(db_path, *args)
    assert stopped.returncode == 78, stopped.stderr
    assert spending_rows(db_path)["images"] == (2, 0)

    resumed = imagepipe(db_path, "resume", "url")  # the fake's URL, from OPENAI_BASE_URL
    assert resumed.returncode == 0, resumed.stderr
    assert openai_fake.paid_creates == 2


def test_an_image_made_whose_download_failed_stays_counted(
    openai_fake: OpenAIFake, db_path: Path, tmp_path: Path
) -> None:
    """DALL-E answers a URL: the create was billed before its download failed with a 500.
    OpenAI bills each create that made an image (the fake replays the Idempotency-Key,
    OpenAI's image API does not), so a cap of one image allows no second create."""
    openai_fake.add_fault(Fault(status=500), endpoint="file", times=1)
    args = ["run", "a fox", "-p", "openai", "-o", "model", "dall-e-2", "-o", "size", "256x256",
            "-o", "response_format", "url", "-s", "cartoon", "--id", "url", "--out",
            str(tmp_path / "img"), "--max-images", "1", "--max-attempts", "3"]  # fmt: skip
    capped = imagepipe(db_path, *args)
    assert capped.returncode == 3, capped.stderr
    assert "image cap reached: 1 of 1 images made or paid for" in capped.stderr
    made = [a for a in openai_fake.log if a.endpoint == "create" and a.status == 200]
    assert len(made) == 1
    assert states(db_path, "url") == {"pending": 1}


#: a prices file that names gpt-image-1 without its low quality: the run's price unknown
HIGH_ONLY = '[openai."gpt-image-1"]\nper_image = { "high/1024x1024" = 0.167 }\n'


def test_a_stored_cost_cap_is_not_lifted_by_a_prices_file_that_unprices_the_model(
    openai_fake: OpenAIFake, db_path: Path, tmp_path: Path
) -> None:
    """The attempts of a model without a price reserve images only: a resume (no
    --max-cost of its own) would go past the run's stored $0.02 without a word (it made
    three more images, $0.0436 in all)."""
    capped = imagepipe(db_path, *run_args("p", tmp_path / "img", "--max-cost", "0.02", "-c", "1"))
    assert capped.returncode == 3, capped.stderr
    assert openai_fake.paid_creates == 1
    prices = tmp_path / "config" / "imagepipe" / "prices.toml"
    prices.parent.mkdir(parents=True)
    prices.write_text(HIGH_ONLY)
    before = checkpointed_bytes(db_path)

    resumed = imagepipe(db_path, "resume", "p", "--max-images", "9")
    assert (resumed.returncode, resumed.stderr.count("\n")) == (2, 1), resumed.stderr
    assert "the --max-cost stored with run 'p' needs a price" in resumed.stderr
    assert checkpointed_bytes(db_path) == before
    assert openai_fake.requests["create"] == 1


def test_a_worker_that_cannot_price_a_capped_run_does_not_run_it(
    openai_fake: OpenAIFake, db_path: Path, tmp_path: Path
) -> None:
    """A worker's own prices file may not know the run's price: it stops (exit 2) rather
    than run the run's branches with nothing reserved against its cost cap."""
    detach = imagepipe(db_path, *run_args("w", tmp_path / "img", "--max-cost", "0.02", "--detach"))
    assert detach.returncode == 0, detach.stderr
    prices = tmp_path / "config" / "imagepipe" / "prices.toml"
    prices.parent.mkdir(parents=True)
    prices.write_text(HIGH_ONLY)

    worker = imagepipe(db_path, "worker", "--once")
    assert (worker.returncode, worker.stderr.count("\n")) == (2, 1), worker.stderr
    assert "the --max-cost stored with run 'w' needs a price" in worker.stderr
    assert openai_fake.requests["create"] == 0
    assert states(db_path, "w") == {"pending": 6}


def test_a_replicate_prediction_whose_poll_failed_stays_counted(
    replicate_fake: ReplicateFake, db_path: Path, tmp_path: Path
) -> None:
    """The prediction was created (and runs, and bills) before its poll was answered 500:
    its reservation is not given back, or the next branch's create goes past the cap."""
    replicate_fake.processing_polls = 1
    replicate_fake.add_fault(Fault(status=500), endpoint="poll", times=1)
    args = ["run", "a fox", "-p", "replicate", "-s", "cartoon", "-n", "2", "--id", "rp",
            "--out", str(tmp_path / "img"), "-c", "1", "--max-images", "1",
            "--max-attempts", "1"]  # fmt: skip
    capped = imagepipe(db_path, *args)
    assert capped.returncode == 3, capped.stderr
    assert "image cap reached: 1 of 1 images made or paid for" in capped.stderr
    assert replicate_fake.paid_creates == 1


def test_an_image_cap_holds_for_the_free_simulated_provider_too(db_path: Path) -> None:
    args = ["run", "a fox", "-n", "2", "--id", "sim", "--sim-latency", "0", "--max-images", "4"]
    capped = imagepipe(db_path, *args)
    assert capped.returncode == 3, capped.stderr
    assert "imagepipe resume sim --max-images 6 goes on" in capped.stderr
    assert states(db_path, "sim") == {"resolved": 4, "pending": 2}
    assert imagepipe(db_path, "resume", "sim", "--max-images", "6").returncode == 0
    assert states(db_path, "sim") == {"resolved": 6}


def test_the_cap_that_goes_on_names_every_cap_the_rest_would_reach(
    openai_fake: OpenAIFake, db_path: Path, tmp_path: Path
) -> None:
    """Stopped at its cost cap with an image cap too: raising the cost alone only reached
    the image cap next (a second stop, a second command); the line names both."""
    args = run_args("both", tmp_path / "img", "--max-cost", "0.03", "--max-images", "3", "-c", "1")
    capped = imagepipe(db_path, *args)
    assert capped.returncode == 3, capped.stderr
    assert capped.stderr.endswith(
        "imagepipe resume both --max-cost 0.07 --max-images 6 goes on\n"
    ), capped.stderr
    assert openai_fake.paid_creates == 2

    resumed = imagepipe(db_path, "resume", "both", "--max-cost", "0.07", "--max-images", "6")
    assert resumed.returncode == 0, resumed.stderr
    assert openai_fake.paid_creates == 6


def test_a_dry_run_says_what_its_caps_allow_and_refuses_what_run_refuses(
    openai_fake: OpenAIFake, db_path: Path, tmp_path: Path
) -> None:
    """A dry run with --max-cost on a model without a price planned the run (exit 0) that
    run refuses (exit 2); with a price, it said nothing of where the cap stops the run."""
    out = tmp_path / "img"
    unknown = imagepipe(db_path, *run_args("d", out, "-o", "model", "gpt-image-9",
                                           "--max-cost", "5", "--dry-run"))  # fmt: skip
    assert (unknown.returncode, unknown.stderr.count("\n")) == (2, 1), unknown.stderr
    assert "--max-cost needs a price" in unknown.stderr

    planned = imagepipe(db_path, *run_args("d", out, "-n", "4", "--max-cost", "0.05", "--dry-run"))
    assert planned.returncode == 0, planned.stderr
    assert (
        "  cap:      --max-cost $0.0500: about 4 of 12 branches fit at their worst case, "
        "then the run stops (exit 3)\n"
    ) in planned.stdout
    both = imagepipe(db_path, *run_args("d", out, "--max-cost", "0.05", "--max-images", "3",
                                        "--dry-run", "--json"))  # fmt: skip
    assert json.loads(both.stdout)["cap"] == {
        "max_cost_micro_usd": 50_000,
        "max_images": 3,
        "branches_that_fit": 3,
    }
    assert sum(openai_fake.requests.values()) == 0
    assert not db_path.exists()
    assert not out.exists()
