"""The run's model reads the workflow's stored arguments without importing the workflow:
what shows a run (the console, ``show``, the JSON) does not load it."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from imagepipe.pipeline import generate_image, image_pipeline
from imagepipe.runs.model import BranchArgs, RunSpec


def _parameters(fn: Callable[..., Any]) -> list[tuple[str, Any]]:
    """The workflow function's parameters after its context, with their defaults."""
    return [(p.name, p.default) for p in list(inspect.signature(fn).parameters.values())[1:]]


def _fields(cls: type) -> list[tuple[str, Any]]:
    return [
        (f.name, f.default if f.default is not dataclasses.MISSING else inspect.Parameter.empty)
        for f in dataclasses.fields(cls)
    ]


def test_a_branchs_arguments_are_the_fields_of_branch_args_in_order() -> None:
    # a version-0 stored call is a positional list, named by these fields
    assert _fields(BranchArgs) == _parameters(generate_image)


def test_a_runs_arguments_are_the_fields_of_its_spec_in_order() -> None:
    assert [name for name, _ in _fields(RunSpec)] == [
        name for name, _ in _parameters(image_pipeline)
    ]


def test_a_stored_positional_call_is_read_by_name() -> None:
    stored = {"version": 0, "positional": ["a fox", "cartoon", 2]}
    assert BranchArgs.read(stored) == BranchArgs("a fox", "cartoon", 2, False, None)
    assert BranchArgs.read(stored).label == "cartoon#2"
    spec = RunSpec.from_stored({"version": 0, "positional": ["a fox", ["cartoon"], True]})
    assert spec == RunSpec("a fox", ("cartoon",), crash=True)


def test_what_shows_a_run_does_not_import_the_workflow() -> None:
    code = (
        "import sys\n"
        "import imagepipe.ui, imagepipe.render, imagepipe.runs\n"
        "print(sorted(m for m in sys.modules if m == 'imagepipe.pipeline'))\n"
    )
    shown = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert shown.stdout == "[]\n"
