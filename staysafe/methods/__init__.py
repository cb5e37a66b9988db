"""The registry of fine-tuning methods: every method and every experiment variant, defined once.

Adding a method: a module in this folder with its :class:`Method` (and hooks, :class:`TrainingHooks`) and its
:class:`Variant` (colour and label), plus one entry in ``_MODULES`` below. See :mod:`staysafe.methods.base`.
"""

from __future__ import annotations

from staysafe.errors import SpecError
from staysafe.methods import adaptive, constant_kl, drift, lisa, safelora, sft, token_wise
from staysafe.methods.base import Method, TrainingHooks, Variant

_MODULES = (  # (methods, variants) of each module, in the order --help and the dashboard list them
    ((sft.METHOD,), sft.VARIANTS),
    ((constant_kl.METHOD,), constant_kl.VARIANTS),
    ((adaptive.METHOD,), adaptive.VARIANTS),
    ((drift.METHOD,), drift.VARIANTS),
    ((token_wise.TOKEN_WISE, token_wise.ADAPTIVE_TOKEN_WISE), token_wise.VARIANTS),
    ((lisa.METHOD,), lisa.VARIANTS),
    ((safelora.METHOD,), safelora.VARIANTS),
)
METHODS: dict[str, Method] = {m.name: m for methods, _ in _MODULES for m in methods}
VARIANTS: dict[str, Variant] = {v.name: v for _, variants in _MODULES for v in variants}
REFERENCE_COLOUR = "#8c8c8c"  # the starting model (step 0): grey on every page


def register(methods: tuple[Method, ...], variants: tuple[Variant, ...]) -> None:
    """Add methods and their variants at run time (a plug-in or a test); a built-in's name is refused."""
    taken = [m.name for m in methods if m.name in METHODS] + [v.name for v in variants if v.name in VARIANTS]
    if taken:
        raise ValueError(f"method or variant name(s) already registered: {', '.join(taken)}")
    METHODS.update({m.name: m for m in methods})
    VARIANTS.update({v.name: v for v in variants})


def unregister(*names: str) -> None:
    for name in names:
        METHODS.pop(name, None)
        VARIANTS.pop(name, None)


def method_named(name: str) -> Method:
    """The method of that ``--method`` name; a SpecError names the choices."""
    if name not in METHODS:
        raise SpecError(f"option method = {name!r} is invalid: expected one of {', '.join(METHODS)}")
    return METHODS[name]


def variant_of(config: dict) -> Variant | None:
    """The variant a run's options (its config.json) are: the one of its training method whose set options match,
    the most specific first (adaptive with risk probe: adaptive-probe; sft on the Vaccine model: vaccine)."""
    candidates = sorted((v for v in VARIANTS.values() if v.method == config.get("method")), key=lambda v: -len(v.sets))
    return next((v for v in candidates if all(config.get(k) == x for k, x in v.sets.items())), None)


def method_options() -> dict[str, tuple[str, ...]]:
    """Option -> the methods that read it, for the options only some methods read (every other applies to all)."""
    out: dict[str, tuple[str, ...]] = {}
    for m in METHODS.values():
        for option in m.options:
            out[option] = out.get(option, ()) + (m.name,)
    return out


PALETTE = ["#2a7f7a", "#c8553d", "#3f6fb5", "#d4a72c", "#7a5ea8", "#5b8c3a", "#b0487a", "#6b6b6b", "#1f9bb0",
           "#a0522d"]  # for anything that is not a registered method (runs by name, risk sources, layers)


def colour(name: str | None, i: int = 0) -> str:
    """One colour per variant (or method) name, the same on every page; anything else the ``i``-th of the
    palette."""
    if name in VARIANTS:
        return VARIANTS[name].colour
    return PALETTE[i % len(PALETTE)]


def regularised(config: dict) -> bool:
    """Whether a run's method pulls toward the reference (its beta can be above 0): the runs worth looking at for
    where the regulariser acted (unknown methods: yes)."""
    return config.get("method") not in METHODS or METHODS[config["method"]].reference


def risk_driven(variant: str) -> bool:
    """Whether an experiment variant's beta follows the estimated risk (adaptive-probe, -judge, -label, ...)."""
    return variant in VARIANTS and METHODS[VARIANTS[variant].method].risk


def is_kl_weight(config: dict) -> bool:
    """Whether a run's recorded step beta is a KL weight (comparable across methods)."""
    return config.get("method") not in METHODS or METHODS[config["method"]].kl_weight


__all__ = ["METHODS", "REFERENCE_COLOUR", "VARIANTS", "Method", "TrainingHooks", "Variant", "colour",
           "is_kl_weight", "method_named", "method_options", "register", "regularised", "risk_driven", "unregister",
           "variant_of"]
