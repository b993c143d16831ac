"""Strategy options: each strategy declares what it takes; unknown names and bad values are refused clearly."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from thinktime.errors import BadInputError

# Keys the surfaces put into Context.options for their own bookkeeping; never strategy settings.
_RESERVED = {"strategy"}


@dataclass(frozen=True)
class Option:
    default: Any
    help: str
    kind: type = int
    check: Callable[[Any], bool] | None = None
    choices: tuple[str, ...] = ()


def parse_value(text: str) -> Any:
    """A command-line `key=value` value as the Python value it spells (int, float, bool, or text)."""
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_options(strategy: str, spec: Mapping[str, Option], given: Mapping[str, Any]) -> dict[str, Any]:
    """`given` checked against `spec`, with defaults filled in."""
    unknown = sorted(set(given) - set(spec) - _RESERVED)
    if unknown:
        raise BadInputError(f"strategy {strategy!r} has no option {', '.join(map(repr, unknown))}",
                            hint=f"its options are: {', '.join(sorted(spec)) or '(none)'}")
    values: dict[str, Any] = {}
    for name, option in spec.items():
        value = given.get(name, option.default)
        if value is not None and name in given:
            value = _coerce(strategy, name, option, value)
        values[name] = value
    return values


def _coerce(strategy: str, name: str, option: Option, value: Any) -> Any:
    where = f"{strategy} option {name!r}"
    if option.kind is bool:
        if isinstance(value, str):
            value = parse_value(value)
        if not isinstance(value, bool):
            raise BadInputError(f"{where} must be true or false, not {value!r}")
    elif option.kind in (int, float):
        if isinstance(value, str):
            value = parse_value(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                option.kind is int and not float(value).is_integer()):
            raise BadInputError(f"{where} must be {'an integer' if option.kind is int else 'a number'}, "
                                f"not {value!r}", hint=option.help)
        value = option.kind(value)
    elif option.kind is str and not isinstance(value, str):
        if option.choices:
            raise BadInputError(f"{where} must be one of {', '.join(option.choices)}")
        return value  # e.g. a ready Scorer object passed from Python
    if option.choices and value not in option.choices:
        raise BadInputError(f"{where} must be one of {', '.join(option.choices)}, not {value!r}")
    if option.check is not None and not option.check(value):
        raise BadInputError(f"{where} has a bad value {value!r}", hint=option.help)
    return value


def positive(value) -> bool:
    return value >= 1


def probability(value) -> bool:
    return 0.0 <= value <= 1.0
