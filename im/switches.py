"""Live switches: the operators' degradation settings, as a JSON document and a frozen object.

Center checks a document with `parse_switches` before it is stored, so a bad value never
reaches the store and the switches in force stay. Rooms and workers poll the store and swap
in a new `Switches` with one attribute assignment: a reader sees the old switches or the new
ones, never a mix. A document replaces the previous one whole; a missing field takes its
default.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

from im.protocol.messages import Check, integer, number, text

#: Size levels of a big room: one per member-count threshold.
LEVELS = 3
DEFAULT_THRESHOLDS = (3000, 10_000, 20_000)
DEFAULT_ROOM_BUDGET = 20
DEFAULT_FLOAT_RANGE = 0.2
MAX_COUNT = 1_000_000_000
MAX_NAME_LEN = 128  # room, worker and IDC names
MAX_TYPE_LEN = 64  # message types, as center accepts them on a push
MAX_ENTRIES = 10_000  # items in one list or map of the document
#: The path of an error about the document as a whole rather than one field.
DOCUMENT = "document"

_count = integer(0, MAX_COUNT)
_threshold = integer(1, MAX_COUNT)
_percent = integer(0, 100)
_fraction = number(0, 1)
_name = text(MAX_NAME_LEN)
_type = text(MAX_TYPE_LEN)


class SwitchError(ValueError):
    """A switch document with a bad value; `field` is its dotted path, e.g. msg_type_ratio.chat."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _empty() -> Mapping[Any, Any]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Switches:
    """One version of the switches; immutable, so it is shared by reference between tasks."""

    big_rooms: frozenset[str] = frozenset()
    size_thresholds: tuple[int, int, int] = DEFAULT_THRESHOLDS
    room_budget: int = DEFAULT_ROOM_BUDGET  # messages/s per member, non-high, big rooms
    msg_type_ratio: Mapping[str, int] = field(default_factory=_empty)  # type -> percent
    common_msg: Mapping[int, frozenset[str]] = field(default_factory=_empty)  # level -> types
    merge_likes: bool = False
    compress_complex: bool = False
    shard_size: int = 0  # members per virtual sub-room; 0 = no shards
    room_pin: Mapping[str, str] = field(default_factory=_empty)  # room -> worker
    idc_budget: Mapping[str, int] = field(default_factory=_empty)  # IDC -> messages/s
    float_range: float = DEFAULT_FLOAT_RANGE
    _dropped: tuple[frozenset[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        dropped: list[frozenset[str]] = [frozenset()]
        for level in range(1, LEVELS + 1):
            dropped.append(dropped[-1] | frozenset(self.common_msg.get(level, ())))
        object.__setattr__(self, "_dropped", tuple(dropped))

    def size_level(self, members: int, room: str) -> int:
        """0 for a room that is not big; else the number of thresholds the member count has
        reached, and at least 1 for a room listed in big_rooms."""
        level = bisect_right(self.size_thresholds, members)
        if level == 0 and room in self.big_rooms:
            return 1
        return level

    def dropped_types(self, level: int) -> frozenset[str]:
        """Types dropped entirely at this size level: common_msg lists a type at the lowest
        level where it goes, and it stays dropped at every level above."""
        return self._dropped[max(0, min(level, LEVELS))]


def _check(path: str, value: Any, check: Check) -> Any:
    problem = check(value)
    if problem is not None:
        raise SwitchError(path, problem)
    return value


def _list(path: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise SwitchError(path, "must be a list")
    if len(value) > MAX_ENTRIES:
        raise SwitchError(path, f"must hold at most {MAX_ENTRIES} items, got {len(value)}")
    return value


def _object(path: str, value: Any, key: Check) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SwitchError(path, "must be a JSON object")
    if len(value) > MAX_ENTRIES:
        raise SwitchError(path, f"must hold at most {MAX_ENTRIES} entries, got {len(value)}")
    for name in value:
        problem = key(name)
        if problem is not None:
            raise SwitchError(f"{path}.{str(name)[:MAX_NAME_LEN]}", f"name {problem}")
    return value


def _names(path: str, value: Any, check: Check) -> frozenset[str]:
    items = _list(path, value)
    return frozenset(_check(f"{path}[{i}]", item, check) for i, item in enumerate(items))


def _big_rooms(path: str, value: Any) -> frozenset[str]:
    return _names(path, value, _name)


def _thresholds(path: str, value: Any) -> tuple[int, int, int]:
    items = _list(path, value)
    if len(items) != LEVELS:
        raise SwitchError(path, f"must hold {LEVELS} member counts, got {len(items)}")
    low, mid, high = (_check(f"{path}[{i}]", item, _threshold) for i, item in enumerate(items))
    if not low < mid < high:
        raise SwitchError(path, f"must be strictly ascending, got {items}")
    return low, mid, high


def _count_field(path: str, value: Any) -> int:
    return _check(path, value, _count)


def _flag(path: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SwitchError(path, "must be true or false")
    return value


def _ratio(path: str, value: Any) -> Mapping[str, int]:
    shares = _object(path, value, _type)
    for name, percent in shares.items():
        _check(f"{path}.{name}", percent, _percent)
    total = sum(shares.values())
    if total > 100:
        raise SwitchError(path, f"percents sum to {total}, over 100")
    return MappingProxyType(dict(shares))


def _level(name: str) -> int | None:
    return int(name) if name in ("1", "2", "3") else None


def _common(path: str, value: Any) -> Mapping[int, frozenset[str]]:
    levels = _object(path, value, _name)
    parsed = {}
    for name, types in levels.items():
        level = _level(name)
        if level is None:
            raise SwitchError(f"{path}.{name}", "is not a size level; expected 1, 2 or 3")
        parsed[level] = _names(f"{path}.{name}", types, _type)
    return MappingProxyType(parsed)


def _room_pin(path: str, value: Any) -> Mapping[str, str]:
    pins = _object(path, value, _name)
    for room, worker in pins.items():
        _check(f"{path}.{room}", worker, _name)
    return MappingProxyType(dict(pins))


def _idc_budget(path: str, value: Any) -> Mapping[str, int]:
    budgets = _object(path, value, _name)
    for idc, budget in budgets.items():
        _check(f"{path}.{idc}", budget, _count)
    return MappingProxyType(dict(budgets))


def _float_range(path: str, value: Any) -> float:
    return float(_check(path, value, _fraction))


_PARSERS: dict[str, Callable[[str, Any], Any]] = {
    "big_rooms": _big_rooms,
    "size_thresholds": _thresholds,
    "room_budget": _count_field,
    "msg_type_ratio": _ratio,
    "common_msg": _common,
    "merge_likes": _flag,
    "compress_complex": _flag,
    "shard_size": _count_field,
    "room_pin": _room_pin,
    "idc_budget": _idc_budget,
    "float_range": _float_range,
}
FIELDS = tuple(_PARSERS)


def parse_switches(document: Any) -> Switches:
    """The Switches of a whole document; unknown fields are refused so a typo is not ignored."""
    if not isinstance(document, Mapping):
        raise SwitchError(DOCUMENT, "must be a JSON object")
    for name in document:
        if name not in _PARSERS:
            raise SwitchError(str(name)[:MAX_NAME_LEN], f"is unknown; expected {', '.join(FIELDS)}")
    return Switches(**{name: _PARSERS[name](name, value) for name, value in document.items()})


def to_document(switches: Switches) -> dict[str, Any]:
    """The canonical JSON document: every field, names sorted, so equal switches compare equal."""
    return {
        "big_rooms": sorted(switches.big_rooms),
        "size_thresholds": list(switches.size_thresholds),
        "room_budget": switches.room_budget,
        "msg_type_ratio": dict(switches.msg_type_ratio),
        "common_msg": {
            str(level): sorted(types) for level, types in sorted(switches.common_msg.items())
        },
        "merge_likes": switches.merge_likes,
        "compress_complex": switches.compress_complex,
        "shard_size": switches.shard_size,
        "room_pin": dict(switches.room_pin),
        "idc_budget": dict(switches.idc_budget),
        "float_range": switches.float_range,
    }


def diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """field -> {"old", "new"} for each top-level field whose value differs (absent = None)."""
    names = dict.fromkeys([*old, *new])
    return {
        name: {"old": old.get(name), "new": new.get(name)}
        for name in names
        if old.get(name) != new.get(name)
    }


class SwitchStore(Protocol):
    """Where the switch document lives, versioned; the register's engines implement it."""

    async def get_switches(self, known_version: int = 0) -> tuple[int, dict] | None:
        """(version, document), or None when the version is still `known_version`; a store
        never written has version 0 and the empty document."""

    async def put_switches(self, document: dict) -> int:
        """Replace the document (JSON-serialisable, else TypeError); the new version, 1, 2, ..."""
