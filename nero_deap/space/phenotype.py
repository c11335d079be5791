"""The phenotype: the contract between the grammar layer and the network decoder.

A :class:`Phenotype` is

* ``layers``: an ordered list of layer dicts, e.g.
  ``{"layer": "conv", "num-filters": 64, "filter-shape": 3, "stride": 1,
  "padding": "same", "act": "relu", "bias": True, "input": [3, 5]}``.
  Keys and values come straight from the grammar's terminals (``key:value``)
  and ranges (``[name,...]``).  ``"input"`` lists the *global* indices of the
  layers feeding this one; ``-1`` is the image.  Every input index is smaller
  than the layer's own index, so the list is already topologically sorted.
  The last dict is the output layer (the structure's ``output`` rule).
* ``learning``: one dict merged from the macro rules (``learning`` by
  default): optimiser, lr, momentum, batch size, ...

Values are typed: ``True``/``False`` become bools, integer text ints, other
numbers floats, ``a,b,c`` a list, anything else a string; a range with
``count > 1`` gives a list.

Text form (one line, Fast-DENSER style, exact round trip)::

    layer:conv num-filters:64 ... input:-1 | layer:fc ... input:0 || learning:adam lr:0.001
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

_INT = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?$|^[+-]?(inf|nan)$")


def parse_value(text: str) -> Any:
    """Type a terminal's value text (the inverse of :func:`format_value`)."""
    if "," in text:
        return [parse_value(part) for part in text.split(",")]
    if text == "True":
        return True
    if text == "False":
        return False
    if _INT.match(text):
        return int(text)
    if _FLOAT.match(text):
        return float(text)
    return text


def format_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(format_value(v) for v in value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _dict_text(d: dict) -> str:
    return " ".join(f"{k}:{format_value(v)}" for k, v in d.items())


def _parse_dict(text: str) -> dict:
    out: dict = {}
    for token in text.split():
        key, value = token.split(":", 1) if ":" in token else (token, "True")
        if key in out:  # a silent "last one wins" once trained another network than the file showed
            raise ValueError(f"{key!r} given twice in {text.strip()[:80]!r}")
        out[key] = parse_value(value)
        if key == "input" and not isinstance(out[key], list):
            out[key] = [out[key]]
    return out


@dataclass
class Phenotype:
    layers: list = field(default_factory=list)
    learning: dict = field(default_factory=dict)

    def to_text(self) -> str:
        """One readable line that :meth:`from_text` turns back into an equal phenotype."""
        return " | ".join(_dict_text(layer) for layer in self.layers) + " || " + _dict_text(self.learning)

    @classmethod
    def from_text(cls, text: str) -> "Phenotype":
        if "||" not in text:
            raise ValueError("phenotype text needs ' || ' between the layers and the learning part")
        layers_text, learning_text = text.split("||", 1)
        layers = [_parse_dict(part) for part in layers_text.split("|") if part.strip()]
        return cls(layers, _parse_dict(learning_text))

    def __str__(self) -> str:
        return self.to_text()
