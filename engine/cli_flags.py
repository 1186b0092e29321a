"""Command-line flags declared once: a dataclass field (its default, its attribute docstring as the help)
plus one `Flag` line saying how the command line spells and parses it.

`python -m engine.generate --help`, `python -m engine.serve --help` and docs/CLI.md
(`python -m engine.cli_doc`) are all made from these declarations (EngineConfig's and GenerateRequest's
in engine/config.py, ServeOptions' in engine/serve/options.py, and the few flags of one command alone),
so a new option is its field and one line. Import-light: engine/config.py uses it.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass
from typing import Any

# --help sections, in the order they are shown.
PROMPTS = "prompts and output"
IMAGE = "the image"
INPUTS = "input images and guidance (docs/PIPELINES.md)"
MODEL = "model"
LAYOUT = "parallel layout"
RUNTIME = "kernels, compilation, timeouts"
SERVER = "server processes and HTTP"
QUEUE = "requests, restarts, shutdown"
GROUPS = (SERVER, QUEUE, PROMPTS, IMAGE, INPUTS, MODEL, LAYOUT, RUNTIME)
FROM_FIELD = type("FromField", (), {"__repr__": lambda self: "FROM_FIELD"})()
"""A Flag's default until it is completed from its field."""


@dataclass(frozen=True)
class Flag:
    dest: str
    """The dataclass field it sets (or, for a flag of one command alone, the parsed attribute)."""
    group: str
    """Its --help section (GROUPS)."""
    name: str = ""
    """The flag; default: --<dest with dashes>."""
    type: Callable | None = None
    choices: tuple | None = None
    action: str | None = None
    """"append" (repeatable; the field gets a tuple) or "store_true"."""
    metavar: str | None = None
    help: str = ""
    """Default: the field's docstring."""
    default: Any = FROM_FIELD
    """Default: the field's."""
    shown: str | None = None
    """The default as --help writes it, where the value would mislead (None meaning "auto")."""
    mutex: str | None = None
    """Flags of one group with the same `mutex` exclude each other."""
    gather: Callable[[list], Any] | None = None
    """A repeatable flag's values (a list, in order) → the field's value; default: a tuple."""

    @property
    def flag(self) -> str:
        return self.name or "--" + self.dest.replace("_", "-")

    @property
    def value_text(self) -> str | None:
        """What follows the flag in --help: its metavar (default: the flag's name in capitals); None for a
        switch, and for a choice (argparse lists the choices)."""
        if self.action == "store_true" or (self.choices and not self.metavar):
            return None
        return self.metavar or self.flag.lstrip("-").replace("-", "_").upper()

    @property
    def default_text(self) -> str | None:
        """The default as --help and docs/CLI.md write it; None: not worth writing."""
        if self.shown is not None:
            return self.shown
        if self.action == "store_true" or self.default is None or self.default in ((), []):
            return None
        return str(self.default)


# ------------------------------------------------------------------ argparse types


def positive_int(text: str) -> int:
    """Counts and degrees: a clear message instead of a crash deeper down."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def auto_or_positive_int(text: str) -> int | None:
    """A degree that may be chosen automatically: "auto" → None."""
    return None if text == "auto" else positive_int(text)


def one_or_list(given: list):
    """A repeatable flag whose field takes one value or several: none given → None, one → that value
    (as the flag was before it could repeat), several → the list, in order."""
    if not given:
        return None
    return given[0] if len(given) == 1 else list(given)


def scales(text: str):
    """"0.7" → 0.7; "0.7,0.5" → (0.7, 0.5)."""
    values = tuple(float(v) for v in text.split(","))
    return values[0] if len(values) == 1 else values


# ------------------------------------------------------------------ declarations → flags


@functools.cache
def attribute_docs(cls: type) -> dict[str, str]:
    """Field → its attribute docstring (the string under it), over `cls` and its dataclass bases, on one line."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):  # no source (a frozen build): no help text
            continue
        body = tree.body[0].body
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def complete(cls: type | None, specs: Sequence[Flag]) -> tuple[Flag, ...]:
    """`specs` with each default and help taken from its field of dataclass `cls` where not given."""
    if cls is None:
        return tuple(specs)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    docs = attribute_docs(cls)
    out = []
    for s in specs:
        assert s.dest in fields, f"{cls.__name__} has no field {s.dest!r}"
        f = fields[s.dest]
        default = s.default
        if default is FROM_FIELD:
            default = f.default if f.default is not MISSING else f.default_factory()
        out.append(dataclasses.replace(s, default=default, help=s.help or docs.get(s.dest, "")))
    return tuple(out)


def add_flags(parser: argparse.ArgumentParser, flags: Sequence[Flag]) -> None:
    """Every flag on `parser`, in its --help section (sections in GROUPS order, flags in declaration order)."""
    groups, mutexes = {}, {}
    for title in sorted({f.group for f in flags}, key=GROUPS.index):
        groups[title] = parser.add_argument_group(title)
    for f in flags:
        where = groups[f.group]
        if f.mutex is not None:
            where = mutexes.get((f.group, f.mutex)) or mutexes.setdefault(
                (f.group, f.mutex), where.add_mutually_exclusive_group())
        kwargs: dict[str, Any] = dict(dest=f.dest, help=_help(f))
        if f.action == "store_true":
            kwargs.update(action="store_true")
        else:
            kwargs.update(default=[] if f.action == "append" else f.default, type=f.type, choices=f.choices,
                          metavar=f.value_text)
            if f.action == "append":
                kwargs.update(action="append")
        where.add_argument(f.flag, **{k: v for k, v in kwargs.items() if v is not None or k == "default"})


def _help(f: Flag) -> str:
    text = f.help.replace("%", "%%")  # argparse formats help with %
    shown = f.default_text
    return text + (f" (default: {shown.replace('%', '%%')})" if shown is not None else "")


def values(args: argparse.Namespace, flags: Sequence[Flag]) -> dict[str, Any]:
    """Field → parsed value of every flag (repeatable ones as tuples, or as their `gather` makes them), for the
    dataclass's constructor."""
    out = {}
    for f in flags:
        value = getattr(args, f.dest)
        if f.action == "append":
            value = f.gather(list(value)) if f.gather is not None else tuple(value)
        out[f.dest] = value
    return out
