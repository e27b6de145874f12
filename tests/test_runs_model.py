"""The run's model reads the workflow's stored arguments without importing the workflow:
what shows a run (the console, ``show``, the JSON) does not load it."""

from __future__ import annotations

import inspect
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from imagepipe.pipeline import generate_image, image_pipeline
from imagepipe.runs import model
from imagepipe.runs.model import BranchArgs, RunSpec


def _parameters(fn: Callable[..., Any]) -> list[tuple[str, Any, Any]]:
    """A function's parameters after its context or step: name, default, annotation."""
    params = list(inspect.signature(fn).parameters.values())[1:]
    return [(p.name, p.default, p.annotation) for p in params]


def test_the_models_signatures_are_the_workflows() -> None:
    # bind_args names a stored call by them, and fills in its defaults
    assert _parameters(model._run_parameters) == _parameters(image_pipeline)
    assert _parameters(model._branch_parameters) == _parameters(generate_image)


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
