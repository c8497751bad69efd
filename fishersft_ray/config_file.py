"""``--config FILE``: a command's settings from a YAML or JSON file, for scheduled runs.

Every flag is a key, spelled as its settings field (``budget_unit`` or ``budget-unit``); the
stage groups are flat, as the flags are. The file's values become the defaults of the flags,
so a flag given on the command line wins. Each value goes through its flag's own parse
function and choices, so a value is accepted in a file exactly when it is on the command line:

    input: s3://corpora/sft/           # --input
    budget: 10000                      # --budget
    storage_options: {anon: false}     # a JSON flag takes a mapping
    budgets: [100, 250]                # a comma-separated flag takes a list
    keep_states: true                  # a switch takes true or false
"""

from __future__ import annotations

import argparse
import difflib
import json
import pathlib

from fishersft_ray.config import shares


class ConfigFileError(ValueError):
    """A config file that cannot be read, or a key or value in it that no flag takes."""


def read_config(path: str) -> dict:
    """The settings mapping in the YAML (or, by a .json name, JSON) file at ``path``."""
    import yaml

    try:
        text = pathlib.Path(path).read_text()
        values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ConfigFileError(f"--config {path}: {exc}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigFileError(f"--config {path}: expected a mapping of settings (key: value), "
                              f"got {type(values).__name__}")
    return values


def use_config_file(flags: dict[str, argparse.Action], path: str) -> None:
    """Make the settings in the file at ``path`` the defaults of ``flags`` (field name →
    argparse action): a flag given on the command line still wins, and a required flag set
    by the file is no longer required."""
    settable = {name: action for name, action in flags.items() if name != "config_file"}
    for key, value in read_config(path).items():
        name = str(key).replace("-", "_")
        action = settable.get(name)
        if action is None:
            nearest = difflib.get_close_matches(name, settable, n=1)
            raise ConfigFileError(f"--config {path}: unknown key {key!r}"
                                  + (f" (did you mean {nearest[0]!r}?)" if nearest else ""))
        action.default = _flag_value(action, value, f"--config {path}: {key}")
        action.required = False


def _flag_value(action: argparse.Action, value, where: str):
    """``value`` as its flag would parse it: the flag's parse function and choices."""
    if action.nargs == 0:  # a switch (--keep-states)
        if not isinstance(value, bool):
            raise ConfigFileError(f"{where}: expected true or false, got {value!r}")
        return value
    if value is None:
        if action.required:
            raise ConfigFileError(f"{where}: needs a value")
        return None
    parse = action.type or str
    single = parse in (str, int, float)
    if isinstance(value, bool) or (single and isinstance(value, (list, dict))):
        raise ConfigFileError(f"{where}: expected one {getattr(parse, '__name__', 'value')} value, got {value!r}")
    try:
        parsed = parse(_flag_text(value, parse))
    except argparse.ArgumentTypeError as exc:
        raise ConfigFileError(f"{where}: {exc}") from None
    except (TypeError, ValueError):
        raise ConfigFileError(f"{where}: invalid {getattr(parse, '__name__', 'value')} value: {value!r}") from None
    if action.choices is not None and parsed not in action.choices:
        raise ConfigFileError(f"{where}: expected one of {', '.join(map(str, action.choices))}, got {value!r}")
    return parsed


def _flag_text(value, parse) -> str:
    """A file's value as the command line's text: a list comma-separated, a mapping as JSON
    (as GROUP=SHARE pairs for --pool-shares)."""
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) if parse is shares else json.dumps(value)
    return str(value)
