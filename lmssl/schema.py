"""Dataclass schemas from YAML mappings: typed parsing whose errors name the key path (and the nearest
valid spelling), and the field docstrings that `lmssl fields` prints. Knows no recipe or stage."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from typing import Any, Literal, Optional, Union

from lmssl.errors import RecipeError


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric field takes, stated beside its type: `batch_size: Annotated[int, Range(1)]`.
    A bound of None is unbounded; NaN and infinities are never in range (a learning rate of .inf is a
    mistake, not a schedule)."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    """True when `low` itself is excluded (a learning rate > 0)."""
    high_open: bool = False
    """True when `high` itself is excluded (a share < 1)."""

    def __str__(self) -> str:
        def number(x: float) -> str:
            return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"

        if self.high is None:
            return f"{'>' if self.low_open else '>='} {number(self.low)}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {number(self.high)}"
        return (f"in {'(' if self.low_open else '['}{number(self.low)}, {number(self.high)}"
                f"{')' if self.high_open else ']'}")

    def contains(self, value: float) -> bool:
        if value != value or value in (float("inf"), float("-inf")):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))


def check_ranges(obj: Any, where: str) -> None:
    """Every Range a dataclass instance's fields state (in lists too), for objects made in code rather
    than parsed from a recipe (parsing checks them already)."""
    for name, tp in typing.get_type_hints(type(obj), include_extras=True).items():
        found = _range_of(tp)
        value = getattr(obj, name, None)
        if found is None or value is None:
            continue
        for index, item in enumerate(value if isinstance(value, list) else [value]):
            if not found.contains(item):
                at = f"{where}.{name}" + (f"[{index}]" if isinstance(value, list) else "")
                raise RecipeError(f"{at}: {item!r} is out of range; it must be {found}")


def field_range(cls: type, name: str) -> Optional[Range]:
    """The Range stated for field `name` of dataclass `cls` (also inside Optional and list), if any."""
    return _range_of(typing.get_type_hints(cls, include_extras=True)[name])


def _range_of(tp: Any) -> Optional[Range]:
    if typing.get_origin(tp) is typing.Annotated:
        return next((m for m in typing.get_args(tp)[1:] if isinstance(m, Range)), None)
    for arg in typing.get_args(tp):
        found = _range_of(arg)
        if found is not None:
            return found
    return None


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written on the line after each dataclass field, for this class and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                    if isinstance(nxt.value.value, str):
                        docs[node.target.id] = nxt.value.value.strip()
    return docs


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        base, *extras = typing.get_args(tp)
        ranges = [str(m) for m in extras if isinstance(m, Range)]
        return _type_name(base) + (f" {ranges[0]}" if ranges else "")
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Annotated:
        base, *extras = typing.get_args(tp)
        value = _coerce(value, base, where)
        for extra in extras:
            if isinstance(extra, Range) and not extra.contains(value):
                raise RecipeError(f"{where}: {value!r} is out of range; it must be {extra}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_null = [a for a in args if a is not type(None)]
        if len(non_null) == 1:  # Optional[X]: say what X expected
            return _coerce(value, non_null[0], where)
        fitting = [a for a in non_null if _same_shape(value, a)]
        if len(fitting) == 1:  # one member takes this shape (a mapping: the dataclass): its error is the useful one
            return _coerce(value, fitting[0], where)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except RecipeError:
                continue
        raise RecipeError(f"{where}: {value!r} is not {_type_name(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise RecipeError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}{hint}")
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {value!r}")
        args = typing.get_args(tp)
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return parse_dataclass(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise RecipeError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        number = _number(value) if isinstance(value, (float, str)) else None
        if number is not None and number.is_integer():
            return int(number)
        raise RecipeError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise RecipeError(f"{where}: expected a number, got {value!r}")
        number = _number(value) if isinstance(value, (int, float, str)) else None  # YAML 1.1 reads 1e-4 as a string
        if number is not None:
            return number
        raise RecipeError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise RecipeError(f"{where}: expected a string, got {value!r}")
    if isinstance(value, tp):
        return value
    raise RecipeError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _same_shape(value: Any, tp: Any) -> bool:
    """Whether `value` is a mapping, a list or a scalar as the type `tp` is (its members, for a Union)."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _same_shape(value, typing.get_args(tp)[0])
    if origin in (Union, types.UnionType):
        return any(_same_shape(value, a) for a in typing.get_args(tp))
    if isinstance(value, dict):
        return origin is dict or dataclasses.is_dataclass(tp)
    if isinstance(value, list):
        return origin is list
    return origin not in (dict, list) and not dataclasses.is_dataclass(tp)


def _number(value) -> Optional[float]:
    try:
        return float(value)
    except ValueError:
        return None


def unknown_key_error(key: str, valid: list[str], where: str) -> RecipeError:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(sorted(valid))}"
    path = f"{where}.{key}" if where else key
    return RecipeError(f"{path}: unknown key {key!r}{hint}")


def parse_dataclass(cls: type, data: dict, where: str) -> Any:
    """Build `cls` from a mapping; unknown keys and wrong types are errors naming the key path."""
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    public = [n for n in fields if n not in ("source", "raw")]
    kwargs = {}
    for key, value in data.items():
        key = str(key)
        if key not in fields or key in ("source", "raw"):
            raise unknown_key_error(key, public, where)
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    built = cls(**kwargs)
    if hasattr(built, "fill_defaults"):
        built.fill_defaults(set(kwargs))
    return built
