"""What the ``dz`` command says about a mistake on its command line, in one line and without a usage dump.

Two halves:

* :func:`early_problem` looks at the raw arguments before Lightning or torch is imported (seconds of CPU on a
  shared machine) and names the mistakes it can see from the file system and the subcommand alone: a missing
  config file, an unknown subcommand, a missing checkpoint file;
* :func:`explain_parser_error` turns a jsonargparse error into its cause, first: an unknown option of a class gets
  the nearest valid name (``did you mean `mu`?``), taken from the class's signature.

This module imports only the standard library.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import sys
from pathlib import Path

__all__ = ["SUBCOMMANDS", "early_problem", "explain_parser_error", "option_names"]

SUBCOMMANDS = {
    "fit": "Runs the full optimization routine.",
    "validate": "Perform one evaluation epoch over the validation set.",
    "test": "Perform one evaluation epoch over the test set.",
    "predict": "Run inference on your data (writes predictions.pt in the run's log folder).",
}
# checkpoint values Lightning resolves itself (ours: "last"); anything with ":" may be a URL or a registry name
_SPECIAL_CKPT = {"best", "last", "hpc", "registry", "null", "None", "none", "~"}  # the last four: no checkpoint


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"did you mean `{close[0]}`? " if close else ""


def _option_value(argv: list[str], i: int, names: tuple[str, ...]) -> tuple[str | None, int]:
    """``(value, tokens used)`` if ``argv[i]`` is one of ``names`` given as ``NAME VALUE`` or ``NAME=VALUE``."""
    token = argv[i]
    for name in names:
        if token == name:
            return (argv[i + 1], 2) if i + 1 < len(argv) else (None, 1)
        if token.startswith(name + "="):
            return token[len(name) + 1:], 1
    return None, 0


def _missing_file(kind: str, value: str) -> str | None:
    if Path(value).is_file():
        return None
    found = "is a folder, not a file" if Path(value).is_dir() else "does not exist"
    where = "" if Path(value).is_absolute() else f" (relative to {Path.cwd()})"
    return f"{kind} file {value!r} {found}{where}."


def early_problem(argv: list[str]) -> str | None:
    """The first mistake in ``argv`` that needs no import to see, as one line; ``None`` if none is visible.

    Checks: every ``-c`` / ``--config`` names an existing file (a value holding ``:`` or ``{`` is left to the
    parser, which reads it as inline YAML); the subcommand is one of ``fit``, ``validate``, ``test``, ``predict``;
    ``--ckpt_path`` names an existing file unless it is ``last``, ``best``, ``hpc``, ``registry`` or holds ``:``.
    Anything else is left to the parser.
    """
    subcommand = None
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("-c") and token not in ("-c", "--config") and not token.startswith("--"):
            value, used = token[2:].lstrip("="), 1  # -cFILE
        else:
            value, used = _option_value(argv, i, ("-c", "--config"))
        if used:
            if value is not None and not any(c in value for c in ":{\n") \
                    and (problem := _missing_file("config", value)):
                return problem
            i += used
            continue
        value, used = _option_value(argv, i, ("--ckpt_path",))
        if used:
            if value is not None and value not in _SPECIAL_CKPT and ":" not in value \
                    and (problem := _missing_file("--ckpt_path: checkpoint", value)):
                return problem
            i += used
            continue
        if subcommand is None and token.startswith("-"):
            subcommand = ""  # an option before the subcommand: its values are the parser's to read
        elif subcommand is None:
            if token not in SUBCOMMANDS:
                return (f"{_suggest(token, list(SUBCOMMANDS))}unknown subcommand {token!r}; "
                        f"choose from {', '.join(SUBCOMMANDS)} (dz --help).")
            subcommand = token
        i += 1
    return None


def option_names(class_path: str) -> list[str]:
    """The ``init_args`` a class accepts: its ``__init__`` parameters and, through ``**kwargs``, its bases'."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    names: list[str] = []
    for klass in inspect.getmro(cls) if inspect.isclass(cls) else [cls]:
        try:
            params = inspect.signature(klass.__init__ if inspect.isclass(klass) else klass).parameters.values()
        except (TypeError, ValueError):
            break
        names += [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self"
                  and p.name not in names]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names


_NOT_ACCEPTED = re.compile(r"Option '([^']+)' is not accepted")
_CLASS_PATH = re.compile(r"Problem with given class_path '([^']+)'")


_BAD_CLASS = re.compile(r"Expected a dot import path string: (\S+)")
# where short class names come from: the modules the dz command imports for jsonargparse to resolve them
_CLASS_HOMES = ("dz_lightning.", "lightning.pytorch.callbacks", "lightning.pytorch.loggers", "torch.optim")


def _known_class_names() -> list[str]:
    names = set()
    for module_name, module in list(sys.modules.items()):
        if module is not None and module_name.startswith(_CLASS_HOMES):
            names.update(n for n, v in vars(module).items() if inspect.isclass(v) and not n.startswith("_"))
    return sorted(names)


def _innermost(message: str) -> str:
    """The cause of a jsonargparse union error: the lines under its last ``Problem with given class_path``."""
    lines = message.strip().splitlines()
    bad = _BAD_CLASS.search(message)
    if bad:
        name = bad.group(1)
        key = re.match(r'Parser key "([^"]+)"', message)
        where = f" for `{key.group(1)}`" if key else ""
        return f"{_suggest(name, _known_class_names())}no class named {name!r}{where} (give a short name of ours " \
               "or a full import path, e.g. dz_lightning.tasks.classification.ZOClassifier)."
    starts = [i for i, line in enumerate(lines) if "Problem with given class_path" in line]
    if not starts:
        return message.strip()
    first = lines[starts[-1]]
    depth = len(first) - len(first.lstrip())
    body = []
    for line in lines[starts[-1] + 1:]:
        if line.strip() and len(line) - len(line.lstrip()) <= depth:
            break
        body.append(line.strip())
    owner = _CLASS_PATH.search(first).group(1).rpartition(".")[2]
    return f"{owner}: {' '.join(b for b in body if b)}"


def explain_parser_error(message: str) -> str:
    """jsonargparse's error ``message`` with its cause first.

    An option that a class does not accept (``--model.init_args.muu``) becomes ``did you mean `mu`? `muu` is not an
    option of ZOClassifier ...``, with the valid name taken from the class's signature; other messages are kept
    as they are (without the usage that jsonargparse prints before them).
    """
    rejected = _NOT_ACCEPTED.search(message)
    if rejected is None:
        return _innermost(message)
    option = rejected.group(1)
    owners = _CLASS_PATH.findall(message[:rejected.start()])
    key = re.match(r'Parser key "([^"]+)"', message)
    where = f" (under `{key.group(1)}`)" if key else ""
    if not owners:
        return f"`{option}` is not an accepted option{where}."
    class_path = owners[-1]
    short = class_path.rpartition(".")[2]
    valid = option_names(class_path)
    listed = f"; its options: {', '.join(valid)}" if valid else ""
    return f"{_suggest(option, valid)}`{option}` is not an option of {short}{where}{listed}."
