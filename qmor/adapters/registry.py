"""The registry of adapter families: name -> `Family` declaration, and what is derived from all of them (which
merge, which go to PEFT, every option as a flag sees it)."""


from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from qmor.adapters import lora, mor, mora, moslora, sira
from qmor.adapters.family import Family, Option, check_value, either, option_key, option_spec
from qmor.errors import QmorError

ADAPTERS: dict[str, Family] = {"lora": lora.FAMILY, "moslora": moslora.FAMILY, "mora": mora.FAMILY,
                               "mor": mor.FAMILY, "sira": sira.FAMILY}


def check_family(name: str) -> Family:
    """The declaration of family `name`, refusing a name that is not registered."""
    if name not in ADAPTERS:
        raise QmorError(f"unknown adapter family {name!r}; choose one of {either(ADAPTERS)}")
    spec = ADAPTERS[name]
    if not isinstance(spec, Family):
        raise TypeError(f"ADAPTERS[{name!r}] is {spec!r}, not a Family declaration; register the family file's "
                        "FAMILY")
    return spec


def mergeable() -> tuple[str, ...]:
    """The families whose adapters fold into the base weights."""
    return tuple(name for name, spec in ADAPTERS.items() if spec.merges)


def peft_families() -> tuple[str, ...]:
    """The families that export to PEFT's LoRA format."""
    return tuple(name for name, spec in ADAPTERS.items() if spec.peft is not None)


def merge_refusal(name: str, instead: str) -> str:
    """Why family `name` cannot merge, then what to do: `instead`, or train a family that merges."""
    return f"{name} {check_family(name).why_not}; {instead}, or train {either(mergeable())} to merge"


@dataclass(frozen=True)
class OptionField:
    """One family option as a CLI flag or an app form field sees it."""

    family: str  # the family it belongs to (a flag such as --experts may serve several)
    name: str  # its field in the family's options (AdapterConfig.options.<name>)
    key: str  # its flat name: CLI flag --key-with-dashes, app form field, key in older config files
    type: type  # int, float or str
    default: Any
    spec: Option  # help, example, range or choices, training_only

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    def check(self, value) -> None:
        """Refuse a value outside this option's range or choices (QmorError, one line)."""
        check_value(self.key, self.spec, value, isinstance(self.default, int))


def option_fields() -> list[OptionField]:
    """Every family's options, in registry order, with what a flag table needs to derive flags and form fields."""
    out = []
    for name, spec in ADAPTERS.items():
        types = typing.get_type_hints(spec.options)
        out += [OptionField(name, f.name, option_key(f), types[f.name], f.default, option_spec(f))
                for f in dataclasses.fields(spec.options)]
    return out


def option_defaults() -> dict[str, Any]:
    """{flat key: default} over every family's options, in registry order (a shared key takes its first default)."""
    out: dict[str, Any] = {}
    for f in option_fields():
        out.setdefault(f.key, f.default)
    return out
