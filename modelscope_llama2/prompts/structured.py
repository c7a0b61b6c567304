"""``response_format`` validated into a :class:`StructuredOutput` (pure: no torch, no grammar engine).

OpenAI's shapes, for the Python API and the server alike: ``{"type": "text"}``
(free text), ``{"type": "json_object"}`` (any JSON object) and
``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``
(valid against the schema, always). A schema using a keyword the grammar
cannot honour is refused here, by name, before any model work: the grammar
engine would ignore it and let through output the schema forbids.

Example:
    >>> parse_response_format({"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer"}}})
    StructuredOutput(kind='json_schema', spec='{"type": "integer"}')
    >>> parse_response_format({"type": "text"}) is None
    True
"""

import json
from typing import Any, List, Optional

from .prompt import StructuredOutput

# The JSON-schema keywords constrained decoding honours; the others (not,
# if/then, multipleOf, uniqueItems, patternProperties, allOf, ...) are refused.
SUPPORTED_SCHEMA_KEYWORDS = frozenset({
    # annotations: no effect on the output
    "$schema", "$id", "$comment", "title", "description", "default", "examples", "deprecated",
    "readOnly", "writeOnly",
    # any type
    "type", "enum", "const", "anyOf", "oneOf", "$ref", "$defs", "definitions",
    # objects
    "properties", "required", "additionalProperties",
    # arrays
    "items", "prefixItems", "minItems", "maxItems",
    # numbers
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    # strings
    "minLength", "maxLength", "pattern", "format",
})
# Keywords whose value maps names to schemas, lists schemas, or is a schema.
_SCHEMA_MAPS = ("properties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalProperties")


def unsupported_schema_keywords(schema: Any, path: str = "") -> List[str]:
    """The paths of every keyword in ``schema`` that constrained decoding cannot honour.

    Example:
        >>> unsupported_schema_keywords({"type": "object", "properties": {"a": {"type": "integer", "multipleOf": 3}},
        ...                              "not": {"required": ["b"]}})
        ['/properties/a/multipleOf', '/not']
    """
    if not isinstance(schema, dict):
        return []
    found: List[str] = []
    for key, value in schema.items():
        where = f"{path}/{key}"
        if key not in SUPPORTED_SCHEMA_KEYWORDS:
            found.append(where)
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                found += unsupported_schema_keywords(sub, f"{where}/{name}")
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            for i, sub in enumerate(value):
                found += unsupported_schema_keywords(sub, f"{where}/{i}")
        elif key in _SCHEMA_VALUES:
            found += unsupported_schema_keywords(value, where)
    return found


def check_json_schema(schema: Any, where: str = "schema") -> None:
    """Raise ``ValueError`` naming ``where`` unless ``schema`` is a JSON schema constrained decoding fully honours.

    Example:
        >>> check_json_schema({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "response_format")
        Traceback (most recent call last):
        ...
        ValueError: response_format: JSON-schema keyword(s) not supported for constrained decoding: /uniqueItems
    """
    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"{where}: expected a JSON schema (an object), got {type(schema).__name__}")
    unsupported = unsupported_schema_keywords(schema)
    if unsupported:
        raise ValueError(f"{where}: JSON-schema keyword(s) not supported for constrained decoding: "
                         f"{', '.join(unsupported)}")


def parse_response_format(value: Any, where: str = "response_format") -> Optional[StructuredOutput]:
    """OpenAI's ``response_format`` as a :class:`StructuredOutput` (``None`` for free text).

    Errors name the field: ``ValueError``/``TypeError`` with ``where`` in the message.
    """
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise TypeError(f"{where}: expected an object with a 'type' ('text', 'json_object' or 'json_schema'), "
                        f"got {value!r}")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput("json_object")
    if kind != "json_schema":
        raise ValueError(f"{where}['type']: expected 'text', 'json_object' or 'json_schema', got {kind!r}")
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise TypeError(f"{where}['json_schema']: expected an object with 'name' and 'schema', got {spec!r}")
    schema = spec.get("schema", {})
    check_json_schema(schema, f"{where}['json_schema']['schema']")
    return StructuredOutput("json_schema", json.dumps(schema, ensure_ascii=False))
