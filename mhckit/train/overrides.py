"""Typed ``--key=value`` overrides on nested config dataclasses (nanoGPT's UX, "config is code").

Keys are dotted paths (``--model.hc.variant=hc``) or, when unambiguous, a bare field name
(``--variant=hc``). Values are parsed by the field's annotated type (int, float, bool, str and
``X | None``); unknown keys, ambiguous names and values of the wrong type are errors that say
what is allowed. Help text comes from the ``# comment`` that follows each field in the source.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from typing import Any

_FIELD_RE = re.compile(r"^\s+(\w+)\s*:[^=#]*(?:=[^#]*)?#\s*(.+)$")


def field_docs(cls: type) -> dict[str, str]:
    """``{field: comment}`` from the class source (the ``# ...`` after each field)."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return {m.group(1): m.group(2).strip() for m in map(_FIELD_RE.match, src.splitlines()) if m}


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def flatten_fields(cls: type, prefix: str = "") -> list[tuple[str, Any, Any, str]]:
    """``[(dotted path, type, default, help)]`` for every leaf field of a nested config dataclass."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_config(tp):
            out += flatten_fields(tp, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out.append((prefix + f.name, tp, default, docs.get(f.name, "")))
    return out


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if args:
        return " | ".join(_type_name(a) for a in args)
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def parse_value(key: str, raw: str, tp: Any) -> Any:
    """Parse ``raw`` as ``tp``; raise ``ValueError`` naming ``key`` otherwise."""
    options = typing.get_args(tp) if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union else (tp,)
    if type(None) in options and raw.lower() in ("none", "null"):
        return None
    for opt in options:
        if opt is bool:
            low = raw.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
        elif opt is int:
            try:
                return int(raw)
            except ValueError:
                pass
        elif opt is float:
            try:
                return float(raw)
            except ValueError:
                pass
        elif opt is str:
            return raw
    raise ValueError(f"--{key}: got {raw!r}; expected {_type_name(tp)}")


def resolve_key(cls: type, key: str) -> tuple[str, Any]:
    """Map a dotted path or a unique bare name to ``(dotted path, type)``."""
    fields = {path: tp for path, tp, _, _ in flatten_fields(cls)}
    if key in fields:
        return key, fields[key]
    matches = [p for p in fields if p.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches[0], fields[matches[0]]
    if matches:
        raise ValueError(f"--{key}: ambiguous; use one of " + ", ".join(f"--{m}" for m in matches))
    close = [p for p in fields if key.replace("-", "_") in p]
    hint = f" (did you mean {', '.join('--' + c for c in close[:4])}?)" if close else ""
    raise ValueError(f"--{key}: unknown option{hint}; see --help for the list")


def parse_overrides(cls: type, args: list[str]) -> dict[str, Any]:
    """``["--a.b=1", ...] -> {"a.b": 1}`` with types checked against ``cls``."""
    out: dict[str, Any] = {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"{arg}: expected --key=value (see --help)")
        key, raw = arg[2:].split("=", 1)
        path, tp = resolve_key(cls, key.replace("-", "_"))
        out[path] = parse_value(key, raw, tp)
    return out


def apply_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    """A new config with ``overrides`` applied (nested dataclasses rebuilt, so validation re-runs)."""
    nested: dict[str, dict[str, Any]] = {}
    flat: dict[str, Any] = {}
    for path, value in overrides.items():
        head, _, rest = path.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[head] = value
    for head, sub in nested.items():
        try:
            flat[head] = apply_overrides(getattr(cfg, head), sub)
        except ValueError as e:  # "n_streams: got 0; ..." from MHCConfig -> "model.hc.n_streams: got 0; ..."
            raise ValueError(_prefixed(head, getattr(cfg, head), str(e))) from None
    return dataclasses.replace(cfg, **flat)


def _prefixed(head: str, sub: Any, message: str) -> str:
    """``message`` with ``head.`` before the field it starts with, if it names a field of ``sub``."""
    first = re.match(r"([\w.]+):", message)
    if first and first.group(1).split(".")[0] in {f.name for f in dataclasses.fields(sub)}:
        return f"{head}.{message}"
    return message


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict[str, Any], name: str | None = None) -> Any:
    """Rebuild a nested config dataclass from :func:`to_dict` output (unknown keys are errors).

    ``name`` is the dotted path of ``data`` in the enclosing config, used in error messages."""
    label = name or cls.__name__
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"{label}: got {type(data).__name__}; expected a {cls.__name__} or a dict of its fields")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{label}: got unknown keys {sorted(unknown)}; expected keys among {sorted(names)}")
    prefix = f"{name}." if name else ""
    kwargs = {k: from_dict(hints[k], v, prefix + k) if _is_config(hints[k]) else v for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:  # "reduce: got 'max'; ..." from GPTConfig -> "model.reduce: got 'max'; ..."
        if not name:
            raise
        raise ValueError(_prefixed(name, cls, str(e))) from None


def help_text(cls: type, defaults: Any | None = None) -> str:
    """One line per option: ``--path=<type> (default) comment``."""
    lines = []
    for path, tp, default, doc in flatten_fields(cls):
        if defaults is not None:
            obj = defaults
            for part in path.split("."):
                obj = getattr(obj, part)
            default = obj
        lines.append(f"  --{path}=<{_type_name(tp)}>  (default: {default!r})  {doc}")
    return "\n".join(lines)
