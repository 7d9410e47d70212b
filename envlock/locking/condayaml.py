"""YAML without a YAML library: the block-style subset envlock writes, and a reader for
exactly that subset (the conda lock in a sidecar).

envlock's core depends on no YAML package. A string that could read as anything but itself is
written JSON-quoted, which YAML reads as a double-quoted scalar. Both ``yaml.safe_load`` and
conda-lock's own parser read the result (a test checks it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_PLAIN = re.compile(r"[A-Za-z_/$][\w.\-/+:@~=$%]*")
_YAML_WORDS = frozenset({"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"})
_INT = re.compile(r"-?(0|[1-9][0-9]*)")


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dict) and not value:
        return "{}"
    if isinstance(value, (list, tuple)) and not value:
        return "[]"
    if not isinstance(value, str):
        raise TypeError(f"cannot write {type(value).__name__} to YAML")
    if _PLAIN.fullmatch(value) and not value.endswith(":") and value.lower() not in _YAML_WORDS:
        return value
    # A JSON string is a YAML double-quoted scalar.
    return json.dumps(value, ensure_ascii=False)


def _emit(obj: Any, indent: int, out: list[str]) -> None:
    pad = " " * indent
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            k = _scalar(str(key))
            if isinstance(value, Mapping) and value:
                out.append(f"{pad}{k}:")
                _emit(value, indent + 2, out)
            elif isinstance(value, (list, tuple)) and value:
                out.append(f"{pad}{k}:")
                _emit(value, indent, out)  # conda-lock's style: items at the key's indent
            else:
                out.append(f"{pad}{k}: {_scalar(value)}")
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            if isinstance(item, Mapping) and item:
                sub: list[str] = []
                _emit(item, indent + 2, sub)
                out.append(f"{pad}- {sub[0][indent + 2:]}")
                out.extend(sub[1:])
            elif isinstance(item, (list, tuple)) and item:
                raise TypeError("nested lists are not written")
            else:
                out.append(f"{pad}- {_scalar(item)}")
    else:
        out.append(pad + _scalar(obj))


def dump_yaml(obj: Any) -> str:
    out: list[str] = []
    _emit(obj, 0, out)
    return "\n".join(out) + "\n"


@dataclass
class _Line:
    indent: int
    text: str
    number: int


def _value(text: str, number: int) -> Any:
    if text.startswith('"'):
        try:
            value, end = json.JSONDecoder().raw_decode(text)
        except ValueError as exc:
            raise ValueError(f"line {number}: bad quoted string") from exc
        if text[end:].strip():
            raise ValueError(f"line {number}: text after a quoted string")
        return value
    if text.startswith("'") and text.endswith("'") and len(text) >= 2:
        return text[1:-1].replace("''", "'")
    if text == "{}":
        return {}
    if text == "[]":
        return []
    if text in ("null", "~", ""):
        return None
    if text in ("true", "false"):
        return text == "true"
    if text[0] in "[]{}&*!|>%@`":
        raise ValueError(f"line {number}: YAML construct not supported here: {text[:20]!r}")
    if _INT.fullmatch(text):
        return int(text)
    return text


def _split_key(text: str, number: int) -> tuple[str, str]:
    if text.startswith('"'):
        try:
            key, end = json.JSONDecoder().raw_decode(text)
        except ValueError as exc:
            raise ValueError(f"line {number}: bad quoted key") from exc
        rest = text[end:]
        if not rest.startswith(":"):
            raise ValueError(f"line {number}: expected ':' after a key")
        return str(key), rest[1:].strip()
    if text.endswith(":"):
        return text[:-1], ""
    key, sep, rest = text.partition(": ")
    if not sep:
        raise ValueError(f"line {number}: expected 'key: value'")
    return key, rest.strip()


def _is_item(line: _Line) -> bool:
    return line.text == "-" or line.text.startswith("- ")


def _is_mapping_text(text: str) -> bool:
    if text.startswith('"'):
        try:
            _, end = json.JSONDecoder().raw_decode(text)
        except ValueError:
            return False
        return text[end:].startswith(":")
    return text.endswith(":") or ": " in text


def _block(lines: list[_Line], i: int, indent: int) -> tuple[Any, int]:
    if _is_item(lines[i]):
        return _sequence(lines, i, indent)
    return _mapping(lines, i, indent)


def _mapping(lines: list[_Line], i: int, indent: int) -> tuple[dict[str, Any], int]:
    out: dict[str, Any] = {}
    while i < len(lines) and lines[i].indent == indent and not _is_item(lines[i]):
        key, rest = _split_key(lines[i].text, lines[i].number)
        i += 1
        if rest:
            out[key] = _value(rest, lines[i - 1].number)
        elif i < len(lines) and (lines[i].indent > indent
                                 or (lines[i].indent == indent and _is_item(lines[i]))):
            out[key], i = _block(lines, i, lines[i].indent)
        else:
            out[key] = None
    if i < len(lines) and lines[i].indent > indent:
        raise ValueError(f"line {lines[i].number}: unexpected indentation")
    return out, i


def _sequence(lines: list[_Line], i: int, indent: int) -> tuple[list[Any], int]:
    out: list[Any] = []
    while i < len(lines) and lines[i].indent == indent and _is_item(lines[i]):
        body = lines[i].text[1:].strip()
        if not body:
            i += 1
            if i < len(lines) and lines[i].indent > indent:
                value, i = _block(lines, i, lines[i].indent)
                out.append(value)
            else:
                out.append(None)
        elif _is_mapping_text(body):
            # "- key: value": the item's mapping continues at the indent of "key".
            lines[i] = _Line(indent + 2, body, lines[i].number)
            value, i = _mapping(lines, i, indent + 2)
            out.append(value)
        else:
            out.append(_value(body, lines[i].number))
            i += 1
    return out, i


def load_yaml(text: str) -> Any:
    """Read the YAML subset :func:`dump_yaml` writes (block mappings and sequences, plain,
    single- and JSON-double-quoted scalars, ``{}``/``[]``, full-line comments). Anything
    else is a ``ValueError`` rather than a guess."""
    lines: list[_Line] = []
    for number, raw in enumerate(text.splitlines(), 1):
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise ValueError(f"line {number}: tab in indentation")
        stripped = raw.strip()
        if not stripped or stripped.startswith("#") or stripped in ("---", "..."):
            continue
        lines.append(_Line(len(raw) - len(raw.lstrip(" ")), stripped, number))
    if not lines:
        return None
    value, i = _block(lines, 0, lines[0].indent)
    if i != len(lines):
        raise ValueError(f"line {lines[i].number}: unexpected content")
    return value


__all__ = ["dump_yaml", "load_yaml"]
