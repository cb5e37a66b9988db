"""Form widgets generated from the option schema (:mod:`staysafe.options`): label, help, choices, range and default
come from the option's field, so the Launch form cannot drift from the CLI or config.json."""

from __future__ import annotations

import typing
from dataclasses import fields

import streamlit as st

from staysafe.options import RunSpec, default_of

_FIELDS = {f.name: f for f in fields(RunSpec)}
_HINTS = typing.get_type_hints(RunSpec)


def option_label(name: str) -> str:
    return _FIELDS[name].metadata.get("label") or name.replace("_", " ")


def option_kind(name: str):
    hint = _HINTS[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args and typing.get_origin(hint) is not list else hint


def option_input(name: str, where=st, *, extra_choices: tuple = (), **widget):
    """The widget for option ``name`` (in container ``where``), with key ``launch_<name>``; ``widget``: extra
    keyword arguments of the streamlit call (a step or format). Returns the value in the option's type."""
    f = _FIELDS[name]
    m, default, kind, key = f.metadata, default_of(f), option_kind(name), f"launch_{name}"
    common = dict(label=option_label(name), help=m["help"], key=key, **widget)
    if isinstance(default, list):
        options = list(dict.fromkeys([*(m.get("choices") or ()), *default]))
        return list(where.multiselect(options=options, default=default, accept_new_options=m["open_choices"],
                                      **common))
    if m.get("choices"):
        options = (*m["choices"], *extra_choices)
        return where.selectbox(options=options, index=options.index(default) if default in options else 0,
                               accept_new_options=m["open_choices"], **common)
    if kind is bool:
        return bool(where.checkbox(value=default, **common))
    if kind in (int, float):
        low = m["low"] if m.get("low") is not None else m.get("above")
        high = m["high"] if m.get("high") is not None else (m["below"] - 0.01 if m.get("below") is not None else None)
        value = where.number_input(min_value=None if low is None else kind(low),
                                   max_value=None if high is None else kind(high), value=kind(default), **common)
        return kind(value)
    text = where.text_input(value=default or "", **common).strip()
    return text or None
