"""The phenotype's vocabulary: one alias table for the grammar dialects nero-deap reads.

Grammars written for Fast-DENSER (``num-filters``, ``layer:pool-max``, ...)
and for EvoDENSS, its PyTorch successor (``out_channels``,
``layer:pool_max``, ...), name the same things differently.  Before a
phenotype is decoded, :func:`canonical_layer` and :func:`canonical_learning`
rewrite every alias to the one name the decoder and the trainer know, so
the rest of the code handles a single vocabulary.  A layer type, key or
optimiser outside it raises :class:`NetworkError`, which makes the candidate
``invalid`` with a reason that lists the known names: a typo in a grammar
shows up in ``individuals.csv`` instead of being silently ignored.
"""
from __future__ import annotations

import math


class NetworkError(ValueError):
    """A phenotype the decoder cannot turn into a network (e.g. unknown layer)."""


# alias -> canonical name.  Canonical names map to themselves implicitly.
LAYER_TYPE_ALIASES = {
    "convolution": "conv", "conv2d": "conv",
    "pool_max": "pool-max", "max-pool": "pool-max", "max_pool": "pool-max", "maxpool": "pool-max",
    "pool_avg": "pool-avg", "avg-pool": "pool-avg", "avg_pool": "pool-avg", "avgpool": "pool-avg",
    "batch_norm": "batch-norm", "batchnorm": "batch-norm", "bn": "batch-norm",
    "dense": "fc", "fully-connected": "fc", "fully_connected": "fc", "linear": "fc", "output": "fc",
    "no-op": "identity", "noop": "identity",
}
LAYER_KEY_ALIASES = {
    "out_channels": "num-filters", "filters": "num-filters",
    "kernel_size": "kernel-size", "pool-size": "kernel-size",
    "out_features": "num-units", "units": "num-units",
    "batch_norm": "batch-norm",
}
# Keys each canonical layer type reads (besides ``layer`` and ``input``).  A conv's window is
# ``filter-shape`` (Fast-DENSER) or ``kernel-size`` (EvoDENSS); a pooling's ``kernel-size``.
LAYER_KEYS = {
    "conv": {"num-filters", "filter-shape", "kernel-size", "stride", "padding", "act", "bias", "batch-norm"},
    "pool-max": {"kernel-size", "filter-shape", "stride", "padding"},
    "pool-avg": {"kernel-size", "filter-shape", "stride", "padding"},
    "pooling": {"kernel-size", "filter-shape", "stride", "padding", "pooling-type"},  # pooling-type:max|avg
    "batch-norm": set(),
    "dropout": {"rate"},
    "fc": {"num-units", "act", "bias", "batch-norm"},
    "identity": set(),
}
OPTIMISER_ALIASES = {"gradient_descent": "gradient-descent", "sgd": "gradient-descent",
                     "sgd-nesterov": "gradient-descent", "momentum": "gradient-descent"}
OPTIMISERS = ("gradient-descent", "adam", "adamw", "rmsprop")
LEARNING_KEY_ALIASES = {"weight_decay": "decay", "weight-decay": "decay", "learning-rate": "lr",
                        "learning_rate": "lr", "alpha": "rho", "batch-size": "batch_size"}
# early_stop and epochs are Fast-DENSER's / EvoDENSS's own budget: read, and ignored (the run's budget rules).
LEARNING_KEYS = {"learning", "lr", "momentum", "nesterov", "decay", "beta1", "beta2", "rho", "amsgrad",
                 "batch_size", "early_stop", "epochs"}


# Learning keys the trainer reads as one number each (engine/train.py: make_optimizer, batch_size_of): canonical
# name -> (test, what the test asks).  A value outside them (``momentum:p.9``, ``lr:-1``, ``decay:-inf``,
# ``decay:1e308``, a list) once failed every candidate using it at training time, so the grammar refuses it when
# read.  beta1, beta2 and rho over 1 are clamped to 0.9999 by the trainer (Fast-DENSER's grammar reaches 1).
LEARNING_NUMBERS = {
    "lr": (lambda v: v > 0, "> 0"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "decay": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "beta1": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "beta2": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "rho": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "batch_size": (lambda v: True, "a finite number"),
}


def learning_number(key: str) -> bool:
    """Whether ``key`` (any alias) is a learning key the trainer reads as one number."""
    return LEARNING_KEY_ALIASES.get(key, key) in LEARNING_NUMBERS


def learning_number_problem(key: str, value) -> str:
    """Why ``value`` (typed as a phenotype holds it: a terminal's parsed text, or a range's bound) cannot be the
    one number learning key ``key`` (any alias) takes ('' if fine, or if ``key`` takes no number)."""
    if not learning_number(key):
        return ""
    if isinstance(value, (list, tuple)):
        return f"{key} takes one number, got a list {','.join(map(str, value))}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{key} must be a number, got {value!r}"
    if not math.isfinite(value):
        return f"{key} must be finite, got {value!r}"
    test, wanted = LEARNING_NUMBERS[LEARNING_KEY_ALIASES.get(key, key)]
    return "" if test(value) else f"{key} must be {wanted}, got {value!r}"


# Keys with a fixed set of values.  Anything else was once read as a default (``padding:smae`` as valid,
# ``bias:false`` as True, ``pooling-type:average`` as max), so it is refused instead.
BOOLEAN = (True, False)
VALUE_CHOICES = {"padding": ("same", "valid"), "pooling-type": ("max", "avg"), "bias": BOOLEAN,
                 "batch-norm": BOOLEAN, "nesterov": BOOLEAN, "amsgrad": BOOLEAN}
# Keys that name the same thing: a layer may give one of them.
SAME_MEANING = (("filter-shape", "kernel-size"),)


def meaning(key: str) -> str:
    """The canonical key a grammar key sets, names of one thing folded (``filters`` and ``kernel-size`` give
    ``num-filters`` and ``filter-shape``): two keys with one meaning in a layer are a conflict."""
    name = LAYER_KEY_ALIASES.get(key, LEARNING_KEY_ALIASES.get(key, key))
    return next((names[0] for names in SAME_MEANING if name in names), name)


def value_problem(key: str, value) -> str:
    """Why ``value`` is not one ``key`` (canonical) may take ('' if fine, or if the key has no fixed set)."""
    allowed = VALUE_CHOICES.get(key)
    if allowed is None:
        return ""
    if allowed is BOOLEAN:
        ok = isinstance(value, bool)
    else:
        ok = isinstance(value, str) and value.lower() in allowed
    return "" if ok else f"{key} must be {' or '.join(map(str, allowed))}, got {value!r}"


def _put(out: dict, sources: dict, key: str, name: str, value, where: str) -> None:
    """``out[name] = value`` unless another key already set it (an alias and its name, or the same key twice)."""
    if name in out:
        raise NetworkError(f"{where}: {name!r} given twice ({sources[name]} and {key})")
    problem = value_problem(name, value)
    if problem:
        raise NetworkError(f"{where}: {problem}")
    out[name], sources[name] = value, key


def _known(names) -> str:
    return ", ".join(sorted(names))


def canonical_layer(layer: dict) -> dict:
    """``layer`` with aliases replaced by canonical names; NetworkError for anything unknown."""
    kind = str(layer.get("layer", "")).lower()
    kind = LAYER_TYPE_ALIASES.get(kind, kind)
    if kind not in LAYER_KEYS:
        raise NetworkError(f"unknown layer type {layer.get('layer')!r} "
                           f"(known: {_known(set(LAYER_KEYS) | set(LAYER_TYPE_ALIASES))})")
    out, sources = {"layer": kind}, {}
    for key, value in layer.items():
        if key == "layer":
            continue
        name = LAYER_KEY_ALIASES.get(key, key)
        if name != "input" and name not in LAYER_KEYS[kind]:
            aliases = {a for a, c in LAYER_KEY_ALIASES.items() if c in LAYER_KEYS[kind]}
            raise NetworkError(f"unknown key {key!r} for layer:{kind} (known: {_known(LAYER_KEYS[kind] | aliases)})")
        _put(out, sources, key, name, value, f"layer:{kind}")
    for names in SAME_MEANING:
        given = [n for n in names if n in out]
        if len(given) > 1:
            raise NetworkError(f"layer:{kind}: {' and '.join(given)} name the same thing; give one")
    if kind == "pooling":  # layer:pooling pooling-type:avg|max is pool-avg / pool-max
        out["layer"] = "pool-avg" if str(out.pop("pooling-type", "max")).lower() == "avg" else "pool-max"
    return out


def canonical_learning(learning: dict) -> dict:
    """The learning dict with aliases replaced; NetworkError for an unknown optimiser or key."""
    out, sources = {}, {}
    for key, value in learning.items():
        name = LEARNING_KEY_ALIASES.get(key, key)
        if name not in LEARNING_KEYS:
            raise NetworkError(f"unknown learning key {key!r} "
                               f"(known: {_known(LEARNING_KEYS | set(LEARNING_KEY_ALIASES))})")
        _put(out, sources, key, name, value, "learning")
    optimiser = str(out.get("learning", "gradient-descent")).lower()
    if optimiser == "sgd-nesterov":
        out.setdefault("nesterov", True)
    optimiser = OPTIMISER_ALIASES.get(optimiser, optimiser)
    if optimiser not in OPTIMISERS:
        raise NetworkError(f"unknown optimiser learning:{out.get('learning')} "
                           f"(known: {_known(set(OPTIMISERS) | set(OPTIMISER_ALIASES))})")
    out["learning"] = optimiser
    return out
