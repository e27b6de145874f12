"""Styles are prompt templates: the text a provider gets for a prompt in a style.

- Six built-in names, each a template such as ``"{prompt}, in a cartoon style"``.
- Any other style text works too: it becomes ``"{prompt}, {style} style"``.
- A user's own templates live in ``styles.toml`` in the user config directory
  (``~/.config/imagepipe/styles.toml`` on Linux), one ``name = "template"`` a line; each
  template must contain ``{prompt}``. ``imagepipe styles`` lists them all.

A run stores the templates of its styles with its identity, so a resume renders exactly
what the first invocation did, whatever the file says by then.
"""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from imagepipe.errors import BadInput
from imagepipe.text import quoted

__all__ = [
    "BUILTIN_TEMPLATES",
    "DEFAULT_STYLES",
    "MAX_STYLE",
    "Style",
    "list_styles",
    "render",
    "templates_for",
    "user_styles_path",
    "validate_style",
]

DEFAULT_STYLES = ("photorealistic", "cartoon", "abstract")
BUILTIN_TEMPLATES = {
    "photorealistic": "{prompt}, photorealistic, natural light, high detail",
    "cartoon": "{prompt}, in a cartoon style",
    "abstract": "{prompt}, as an abstract composition of shapes and colour",
    "watercolor": "{prompt}, as a watercolor painting",
    "pixel-art": "{prompt}, as pixel art",
    "sketch": "{prompt}, as a pencil sketch",
}
OTHER_TEMPLATE = "{prompt}, {style} style"
MAX_STYLE = 100


@dataclass(frozen=True)
class Style:
    name: str
    template: str
    source: str  # "built-in", the user file's path, or "any text"


def user_styles_path() -> Path:
    import platformdirs

    override = os.environ.get("IMAGEPIPE_STYLES")
    if override:
        return Path(override)
    return Path(platformdirs.user_config_dir("imagepipe", appauthor=False)) / "styles.toml"


def _user_templates() -> dict[str, str]:
    path = user_styles_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read the style file {str(path)!r}: {exc}") from None
    import tomllib

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"the style file {str(path)!r} is not valid TOML: {exc}") from None
    templates: dict[str, str] = {}
    for name, template in data.items():
        if not isinstance(template, str) or "{prompt}" not in template:
            raise BadInput(
                f"style {quoted(name)} in {quoted(str(path))} must be a string "
                "containing {prompt}"
            )
        validate_style(name)
        templates[name] = template
    return templates


def validate_style(style: str) -> None:
    if not style.strip():
        raise BadInput("a style is empty; give a name such as cartoon, or any style text")
    if len(style) > MAX_STYLE:
        raise BadInput(f"a style has {len(style)} characters; at most {MAX_STYLE}")
    if any(unicodedata.category(ch) == "Cc" for ch in style):
        raise BadInput(f"style {quoted(style)} holds control characters")


def templates_for(styles: tuple[str, ...] | list[str]) -> dict[str, str]:
    """The template of each style: the user's, else the built-in, else the generic one."""
    user = _user_templates()
    return {s: user.get(s) or BUILTIN_TEMPLATES.get(s) or OTHER_TEMPLATE for s in styles}


_PLACEHOLDER = re.compile(r"\{(prompt|style)\}")


def render(template: str, prompt: str, style: str) -> str:
    """The text for ``prompt`` in ``style``: the template's own ``{prompt}`` and ``{style}``
    are replaced, in one pass. What the prompt or the style brings is text, never a
    placeholder ("a {style} of {prompt}" is sent as typed); no other ``{...}`` is read."""
    values = {"prompt": prompt, "style": style}
    return _PLACEHOLDER.sub(lambda match: values[match[1]], template)


def list_styles() -> list[Style]:
    user = _user_templates()
    path = str(user_styles_path())
    listed = [
        Style(name, user.get(name, template), path if name in user else "built-in")
        for name, template in BUILTIN_TEMPLATES.items()
    ]
    listed += [Style(name, t, path) for name, t in user.items() if name not in BUILTIN_TEMPLATES]
    listed.append(Style("<any text>", OTHER_TEMPLATE, "any other style"))
    return listed
