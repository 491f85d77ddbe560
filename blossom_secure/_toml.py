"""Reading operator TOML files with every problem collected, never just the first.

Policy, site and federation files are data only: plain TOML tables and values, no
expressions, no imports, no references evaluated. A :class:`Table` wraps one parsed table
and records a :class:`~blossom_secure.errors.Problem` for each missing key, wrong type,
impossible value or unknown key, so a loader can report them all at once.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any

from blossom_secure.errors import PolicyError, Problem

#: Operator files are small; anything bigger is a mistake (or an attack on the parser).
MAX_CONFIG_BYTES = 1 << 20

_INVALID = object()
_INVALID_RANGE = object()

_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a table"}


def read_toml(path: Path, problems: list[Problem]) -> dict[str, Any] | None:
    """Parse ``path`` as TOML; on failure record a problem and return ``None``."""
    try:
        if not path.is_file():
            problems.append(Problem(str(path), "", "file not found"))
            return None
        data = path.read_bytes()
    except OSError as exc:
        problems.append(Problem(str(path), "", f"cannot read file ({exc.strerror or exc})"))
        return None
    if len(data) > MAX_CONFIG_BYTES:
        problems.append(Problem(str(path), "", f"file is larger than {MAX_CONFIG_BYTES} bytes"))
        return None
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        problems.append(Problem(str(path), "", "file is not UTF-8 text"))
    except tomllib.TOMLDecodeError as exc:
        problems.append(Problem(str(path), "", f"not valid TOML ({exc})"))
    return None


def read_root_table(path: Path) -> Table:
    """Parse ``path`` and wrap it as the root :class:`Table` of a new problem list.

    Raises:
        PolicyError: the file is missing, unreadable, too large or not TOML.
    """
    problems: list[Problem] = []
    data = read_toml(path, problems)
    if data is None:
        raise PolicyError(problems)
    return Table(str(path), "", data, problems)


class Table:
    """One TOML table being validated.

    Args:
        file: The file name used in problems.
        prefix: The dotted key of this table (``""`` for the root).
        data: The parsed table.
        problems: Shared list the problems are appended to.
    """

    def __init__(self, file: str, prefix: str, data: dict[str, Any], problems: list[Problem]) -> None:
        self.file = file
        self.prefix = prefix
        self.data = data
        self.problems = problems
        self._seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def problem(self, name: str, reason: str) -> None:
        self.problems.append(Problem(self.file, self.key(name), reason))

    def _get(self, name: str, kind: type, required: bool) -> Any:
        """The value of ``name`` if present and of type ``kind``, else ``_INVALID``."""
        self._seen.add(name)
        if name not in self.data:
            if required:
                self.problem(name, "required key is missing")
            return _INVALID
        value = self.data[name]
        ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            self.problem(name, f"must be {_TYPE_NAMES[kind]}, not {_describe(value)}")
            return _INVALID
        if kind is float and not math.isfinite(value):
            self.problem(name, "must be a finite number")
            return _INVALID
        return value

    def str(self, name: str, *, required: bool = True, default: str | None = None) -> str | None:
        value = self._get(name, str, required)
        if value is _INVALID:
            return default
        if value == "":
            self.problem(name, "must not be empty")
            return default
        return value

    def int(self, name: str, *, required: bool = True, default: int | None = None,
            minimum: int | None = None, maximum: int | None = None) -> int | None:
        value = self._get(name, int, required)
        if value is _INVALID:
            return default
        checked = self._range(name, value, minimum, maximum)
        return default if checked is _INVALID_RANGE else checked

    def float(self, name: str, *, required: bool = True, default: float | None = None,
              minimum: float | None = None, maximum: float | None = None,
              exclusive_minimum: float | None = None, exclusive_maximum: float | None = None) -> float | None:
        value = self._get(name, float, required)
        if value is _INVALID:
            return default
        if exclusive_minimum is not None and not value > exclusive_minimum:
            self.problem(name, f"must be greater than {exclusive_minimum:g}, not {value:g}")
            return default
        if exclusive_maximum is not None and not value < exclusive_maximum:
            self.problem(name, f"must be less than {exclusive_maximum:g}, not {value:g}")
            return default
        checked = self._range(name, value, minimum, maximum)
        return default if checked is _INVALID_RANGE else checked

    def bool(self, name: str, *, required: bool = True, default: bool | None = None) -> bool | None:
        value = self._get(name, bool, required)
        return default if value is _INVALID else value

    def str_list(self, name: str, *, required: bool = True, default: list[str] | None = None,
                 non_empty: bool = True) -> list[str] | None:
        value = self._get(name, list, required)
        if value is _INVALID:
            return default
        bad = [v for v in value if not isinstance(v, str) or v == ""]
        if bad:
            self.problem(name, "must be a list of non-empty strings")
            return default
        if non_empty and not value:
            self.problem(name, "must not be empty")
            return default
        if len(set(value)) != len(value):
            self.problem(name, "must not list the same value twice")
            return default
        return list(value)

    def int_list(self, name: str, *, required: bool = True, default: list[int] | None = None,
                 minimum: int = 1, length: int | None = None) -> list[int] | None:
        value = self._get(name, list, required)
        if value is _INVALID:
            return default
        if not value or any(not isinstance(v, int) or isinstance(v, bool) or v < minimum for v in value):
            self.problem(name, f"must be a non-empty list of integers >= {minimum}")
            return default
        if length is not None and len(value) != length:
            self.problem(name, f"must have {length} entries, not {len(value)}")
            return default
        return list(value)

    def float_list(self, name: str, *, required: bool = True, default: list[float] | None = None,
                   exclusive_minimum: float = 0.0, maximum: float | None = None) -> list[float] | None:
        """A non-empty list of distinct finite numbers, each above ``exclusive_minimum`` (and at
        most ``maximum``)."""
        value = self._get(name, list, required)
        if value is _INVALID:
            return default
        if not value or any(not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
                            or not v > exclusive_minimum or (maximum is not None and v > maximum) for v in value):
            bound = f" and at most {maximum:g}" if maximum is not None else ""
            self.problem(name, f"must be a non-empty list of numbers greater than {exclusive_minimum:g}{bound}")
            return default
        if len(set(value)) != len(value):
            self.problem(name, "must not list the same value twice")
            return default
        return [float(v) for v in value]

    def float_pair(self, name: str, *, required: bool = True, default: tuple[float, float] | None = None
                   ) -> tuple[float, float] | None:
        value = self._get(name, list, required)
        if value is _INVALID:
            return default
        if (len(value) != 2 or any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in value)
                or not value[0] < value[1]):
            self.problem(name, "must be two numbers [low, high] with low < high")
            return default
        return (float(value[0]), float(value[1]))

    def table(self, name: str, *, required: bool = True) -> Table | None:
        value = self._get(name, dict, required)
        if value is _INVALID:
            return None
        return Table(self.file, self.key(name), value, self.problems)

    def choice(self, name: str, choices: tuple[str, ...], *, required: bool = True,
               default: str | None = None) -> str | None:
        value = self.str(name, required=required, default=default)
        if value is not None and value not in choices:
            self.problem(name, f"must be one of {', '.join(choices)}, not {value!r}")
            return default
        return value

    def mark_seen(self, *names: str) -> None:
        self._seen.update(names)

    def finish(self) -> None:
        """Record a problem for every key that no accessor asked for."""
        for name in self.data:
            if name not in self._seen:
                self.problem(name, "unknown key")

    def _range(self, name: str, value: Any, minimum: Any, maximum: Any) -> Any:
        if minimum is not None and value < minimum:
            self.problem(name, f"must be at least {minimum}, not {value}")
            return _INVALID_RANGE
        if maximum is not None and value > maximum:
            self.problem(name, f"must be at most {maximum}, not {value}")
            return _INVALID_RANGE
        return value


def _describe(value: Any) -> str:
    for kind, name in _TYPE_NAMES.items():
        if isinstance(value, kind):
            return name
    return type(value).__name__
