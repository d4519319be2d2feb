"""Dataclass validation and the OpenAPI schemas derived from the same dataclasses.

A request schema is a frozen dataclass whose fields carry a `spec(...)` in their metadata. `from_json`
returns an instance or raises HTTPError(422) listing every bad field; `json_schema` describes the very
same rules for /openapi.json, so the documentation cannot drift from what is enforced.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal, Mapping, TypeVar, Union

from .errors import HTTPError

T = TypeVar("T")
NOTHING = object()


@dataclass(frozen=True)
class Spec:
    description: str = ""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    min_length: int | None = None
    max_length: int | None = None
    min_items: int | None = None
    max_items: int | None = None
    enum: tuple[Any, ...] | None = None  # the only values allowed (null among them if listed)
    example: Any = None


def spec(**kwargs: Any) -> dict[str, Spec]:
    """Field metadata: `field(default=..., metadata=spec(ge=0, le=2, description="..."))`."""
    return {"spec": Spec(**kwargs)}


# Overrides let limits that come from settings (e.g. MAX_TOKENS_LIMIT) tighten a field at run time:
# {"max_tokens": {"le": 512}}. The same overrides feed validation and the OpenAPI document.
Overrides = Mapping[str, Mapping[str, Any]]
NO_OVERRIDES: Overrides = types.MappingProxyType({})


@cache
def _fields(cls: type) -> tuple[tuple[dataclasses.Field, Any, Spec], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f, hints[f.name], f.metadata.get("spec", Spec())) for f in dataclasses.fields(cls))


def _spec_for(name: str, base: Spec, overrides: Overrides) -> Spec:
    extra = overrides.get(name)
    return _merged(base, tuple(extra.items())) if extra else base


@cache
def _merged(base: Spec, extra: tuple[tuple[str, Any], ...]) -> Spec:
    return dataclasses.replace(base, **dict(extra))


@cache
def _layout(cls: type) -> tuple[dict[str, int], frozenset[int]]:
    """Each field's place among the class's fields, and the places of the required ones: a request's fields are
    checked in the class's order, at a cost that grows with the fields it sends, not with the fields there are."""
    known = _fields(cls)
    required = frozenset(i for i, (f, _, _) in enumerate(known)
                         if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    return {f.name: i for i, (f, _, _) in enumerate(known)}, required


@cache
def _defaults(cls: type) -> dict[str, Any]:
    """The fields that have a plain default, with it (a field sent with its default value is a field unsent)."""
    return {f.name: f.default for f, _, _ in _fields(cls) if f.default is not dataclasses.MISSING}


@cache
def _field_names(cls: type) -> tuple[str, ...] | None:
    return tuple(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else None


def plain(value: Any) -> Any:
    """A validated dataclass as plain JSON data (dataclasses.asdict without its deep copies), fields left at None
    (unset, or sent as null: the same request) omitted."""
    kind = type(value)
    if kind in PLAIN_TYPES:
        return value
    if kind is list:
        return [plain(v) for v in value]
    names = _field_names(kind)
    if names is None:
        return value
    return {name: plain(field) for name in names if (field := getattr(value, name)) is not None}


PLAIN_TYPES = frozenset({str, int, float, bool, type(None)})


def as_sent(raw: Any, body: Any) -> dict[str, Any]:
    """A request as a cache key sees it: the fields it sent, known ones as validated (`plain`; one sent with its
    default, null included, is one unsent), the ones the class does not know (an upstream gets them) as they came.
    Costs what the request sends, not what the class could hold."""
    if not isinstance(raw, dict):
        return plain(body)
    places, defaults = _layout(type(body))[0], _defaults(type(body))
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in places:
            out[key] = value
        elif (field := getattr(body, key)) is not None and (key not in defaults or field != defaults[key]):
            out[key] = plain(field)
    return out


class _Errors(list):
    def add(self, path: str, message: str) -> None:
        self.append({"field": path, "message": message})


def from_json(cls: type[T], data: Any, *, overrides: Overrides = NO_OVERRIDES, allow_unknown: bool = False) -> T:
    """Validate parsed JSON against dataclass `cls`; HTTPError(422) names each field that is wrong."""
    errors = _Errors()
    value = _dataclass(cls, data, "", errors, overrides, allow_unknown)
    if errors:
        first = errors[0]
        summary = "; ".join(f"{e['field'] or 'body'}: {e['message']}" for e in errors)
        raise HTTPError(422, "validation_error", summary, field=first["field"] or None, details=list(errors))
    return value


def _dataclass(cls: type, data: Any, path: str, errors: _Errors, overrides: Overrides, allow_unknown: bool) -> Any:
    if not isinstance(data, dict):
        errors.add(path, f"must be a JSON object, not {_json_type(data)}")
        return None
    known = _fields(cls)
    places, required = _layout(cls)
    if not allow_unknown:
        for key in data:
            if key not in places:
                errors.add(_join(path, key), "unknown field")
    kwargs: dict[str, Any] = {}
    for place in sorted(required.union(places[key] for key in data if key in places)):
        f, hint, base = known[place]
        where = _join(path, f.name)
        if f.name not in data:
            errors.add(where, "is required")
            continue
        checked = _spec_for(f.name, base, overrides) if not path else base
        before = len(errors)
        converted = _convert(hint, data[f.name], where, errors, overrides, allow_unknown)
        if len(errors) == before:
            _check(converted, checked, where, errors)
            kwargs[f.name] = converted
    if len(errors):
        return None
    return cls(**kwargs)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


@cache
def _shape(hint: Any) -> tuple[Any, tuple[Any, ...]]:
    return typing.get_origin(hint), typing.get_args(hint)


def _convert(hint: Any, value: Any, path: str, errors: _Errors, overrides: Overrides, allow_unknown: bool) -> Any:
    if hint is type(value) and hint in (str, int, float, bool):
        return value  # the common case, decided without looking at the type's structure
    origin, options = _shape(hint)
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in options:
                return None
            errors.add(path, "must not be null")
            return None
        candidates = [o for o in options if o is not type(None)]
        for option in candidates:
            trial = _Errors()
            converted = _convert(option, value, path, trial, overrides, allow_unknown)
            if not trial:
                return converted
            if len(candidates) == 1:
                errors.extend(trial)
                return None
        errors.add(path, "must be " + " or ".join(_describe(o) for o in candidates))
        return None
    if origin is Literal:
        allowed = options
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            errors.add(path, "must be " + " or ".join(json.dumps(a) for a in allowed))
        return value
    if origin is list:
        if not isinstance(value, list):
            errors.add(path, f"must be {_describe(hint)}, not {_json_type(value)}")
            return None
        (item,) = options
        return [_convert(item, v, f"{path}[{i}]", errors, overrides, allow_unknown) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            errors.add(path, f"must be an object, not {_json_type(value)}")
            return None
        item = options[1]
        return {k: _convert(item, v, f"{path}.{k}", errors, overrides, allow_unknown) for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return _dataclass(hint, value, path, errors, overrides, allow_unknown)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            errors.add(path, f"must be a boolean, not {_json_type(value)}")
        return value
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            errors.add(path, f"must be an integer, not {_json_type(value)}")
        return value
    if hint is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            errors.add(path, f"must be a number, not {_json_type(value)}")
            return value
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            errors.add(path, f"must be a string, not {_json_type(value)}")
        return value
    raise TypeError(f"unsupported schema type {hint!r}")


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is list:
        item = typing.get_args(hint)[0]
        plural = {str: "strings", int: "integers", float: "numbers", bool: "booleans"}.get(item, "objects")
        return f"an array of {plural}"
    if dataclasses.is_dataclass(hint):
        return "an object"
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}.get(hint, str(hint))


def _check(value: Any, rule: Spec, path: str, errors: _Errors) -> None:
    if rule.enum is not None and value not in rule.enum:
        errors.add(path, "must be " + " or ".join(json.dumps(a) for a in rule.enum))
        return
    if value is None:
        return
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if rule.ge is not None and value < rule.ge:
            errors.add(path, f"must be >= {_num(rule.ge)}")
        if rule.gt is not None and value <= rule.gt:
            errors.add(path, f"must be > {_num(rule.gt)}")
        if rule.le is not None and value > rule.le:
            errors.add(path, f"must be <= {_num(rule.le)}")
    if isinstance(value, str):
        if rule.min_length is not None and len(value) < rule.min_length:
            errors.add(path, "must not be empty" if rule.min_length == 1 else f"needs at least {rule.min_length} characters")
        if rule.max_length is not None and len(value) > rule.max_length:
            errors.add(path, "must be empty (not supported)" if rule.max_length == 0
                       else f"must be at most {rule.max_length} characters")
    if isinstance(value, dict):  # an object of strings: max_items bounds its pairs, max_length its values
        if rule.max_items is not None and len(value) > rule.max_items:
            errors.add(path, f"must have at most {rule.max_items} properties")
        for key, item in value.items():
            if isinstance(item, str) and rule.max_length is not None and len(item) > rule.max_length:
                errors.add(f"{path}.{key}", f"must be at most {rule.max_length} characters")
    if isinstance(value, list):
        if rule.min_items is not None and len(value) < rule.min_items:
            errors.add(path, f"needs at least {rule.min_items} item(s)")
        if rule.max_items is not None and len(value) > rule.max_items:
            errors.add(path, f"must have at most {rule.max_items} items")
        for i, item in enumerate(value):  # a length rule on a list applies to its strings
            if isinstance(item, str) and rule.min_length is not None and len(item) < rule.min_length:
                errors.add(f"{path}[{i}]", "must not be empty")
            if isinstance(item, str) and rule.max_length is not None and len(item) > rule.max_length:
                errors.add(f"{path}[{i}]", f"must be at most {rule.max_length} characters")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


# --- OpenAPI 3.0 schemas ---------------------------------------------------------------------------


def json_schema(
    cls: type, components: dict[str, Any], overrides: Overrides = NO_OVERRIDES, *, closed: bool = False
) -> dict[str, Any]:
    """Register `cls` (and the dataclasses it uses) in `components`; return a $ref to it.
    `closed` documents that unknown fields are rejected (from_json without allow_unknown)."""
    name = cls.__name__
    if name not in components:
        components[name] = {}  # placeholder first: schemas may refer to themselves
        properties: dict[str, Any] = {}
        required: list[str] = []
        for f, hint, base in _fields(cls):
            rule = _spec_for(f.name, base, overrides)
            schema = _type_schema(hint, components, closed)
            schema.update(_rule_schema(rule, schema))
            if f.default is not dataclasses.MISSING and f.default is not None:
                schema["default"] = f.default
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                required.append(f.name)
            properties[f.name] = schema
        doc: dict[str, Any] = {"type": "object", "properties": properties}
        if closed:
            doc["additionalProperties"] = False
        if required:
            doc["required"] = required
        if cls.__doc__ and not cls.__doc__.startswith(f"{name}("):
            doc["description"] = " ".join(cls.__doc__.split())
        # What the field types cannot say (rules between fields, the shape of an Any field), which from_json's
        # caller checks: {"properties": {field: {...}}} is merged into those fields, anything else into the object.
        for key, value in getattr(cls, "json_schema_extra", {}).items():
            if key == "properties":
                for field_name, more in value.items():
                    properties[field_name].update(more)
            else:
                doc[key] = value
        components[name] = doc
    return {"$ref": f"#/components/schemas/{name}"}


def _type_schema(hint: Any, components: dict[str, Any], closed: bool = False) -> dict[str, Any]:
    """`closed`: nested objects reject unknown fields too (from_json's allow_unknown applies at every depth)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = [o for o in typing.get_args(hint) if o is not type(None)]
        nullable = len(options) < len(typing.get_args(hint))
        schema = _type_schema(options[0], components, closed) if len(options) == 1 else {
            "oneOf": [_type_schema(o, components, closed) for o in options]
        }
        if "$ref" in schema and nullable:
            schema = {"allOf": [schema]}
        if nullable:
            schema["nullable"] = True
            if "enum" in schema:  # OpenAPI 3.0.3: with an enum, null is allowed only if listed
                schema["enum"] = [*schema["enum"], None]
        return schema
    if origin is Literal:
        values = list(typing.get_args(hint))
        kind = "boolean" if isinstance(values[0], bool) else "string" if isinstance(values[0], str) else "integer"
        return {"type": kind, "enum": values}
    if origin is list:
        return {"type": "array", "items": _type_schema(typing.get_args(hint)[0], components, closed)}
    if origin is dict:
        return {"type": "object", "additionalProperties": _type_schema(typing.get_args(hint)[1], components, closed)}
    if dataclasses.is_dataclass(hint):
        return json_schema(hint, components, closed=closed)
    if hint is Any:
        return {}
    return {str: {"type": "string"}, int: {"type": "integer"}, float: {"type": "number"}, bool: {"type": "boolean"}}[hint]


def _rule_schema(rule: Spec, schema: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if rule.description:
        out["description"] = rule.description
    if rule.example is not None:
        out["example"] = rule.example
    if rule.ge is not None:
        out["minimum"] = rule.ge
    if rule.gt is not None:
        out["minimum"], out["exclusiveMinimum"] = rule.gt, True
    if rule.le is not None:
        out["maximum"] = rule.le
    if rule.enum is not None:
        out["enum"] = list(rule.enum)
        if None in rule.enum:
            out["nullable"] = True
    for member in [schema, *schema.get("oneOf", ())]:
        target = out if member is schema else member
        if member.get("type") == "array":
            if rule.min_items is not None:
                target["minItems"] = rule.min_items
            if rule.max_items is not None:
                target["maxItems"] = rule.max_items
            if rule.min_length is not None and member["items"].get("type") == "string":
                member["items"]["minLength"] = rule.min_length
            if rule.max_length is not None and member["items"].get("type") == "string":
                member["items"]["maxLength"] = rule.max_length
        elif member.get("type") == "object" and isinstance(member.get("additionalProperties"), dict):
            if rule.max_items is not None:
                target["maxProperties"] = rule.max_items
            if rule.max_length is not None and member["additionalProperties"].get("type") == "string":
                member["additionalProperties"]["maxLength"] = rule.max_length
        elif member is not schema and member.get("type") == "string":
            if rule.min_length is not None:
                member["minLength"] = rule.min_length
            if rule.max_length is not None:
                member["maxLength"] = rule.max_length
    if schema.get("type") == "string":
        if rule.min_length is not None:
            out["minLength"] = rule.min_length
        if rule.max_length is not None:
            out["maxLength"] = rule.max_length
    return out
