"""Sphinx configuration: the docs are Markdown (MyST), themed with Furo, as llm's and
sqlite-utils' are. Built with warnings as errors by .ci/run:

    .venv/bin/sphinx-build -W --keep-going -b html docs docs/_build/html
"""

project = "imagepipe"
author = "imagepipe contributors"
copyright = "imagepipe contributors"

extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# `[text](page.md#a-heading)` links: MyST makes anchors for headings down to ###.
myst_heading_anchors = 3

html_theme = "furo"
html_title = "imagepipe"
