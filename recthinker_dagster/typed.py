"""Scalar fields read from YAML (recipes, profiles) checked against the type their dataclass
declares, so a wrong value is an error that names the field, not a failure deep in a stage."""

from __future__ import annotations


def typed_scalar(kind: str, name: str, annotation: str, value):
    """``value`` as the scalar type the field declares. YAML 1.1 reads ``1e-4`` (no dot) as a
    string, so a float field takes a numeric string; anything else of the wrong type is an error
    that names the field, not a failure deep inside the trainer."""
    optional = annotation.endswith("| None")
    base = annotation.removesuffix("| None").strip()
    if value is None and optional:
        return None
    if base == "float" and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return value  # an int stays as written: the recipe digest hashes the values as given
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif base == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif base == "bool" and isinstance(value, bool):
        return value
    elif base == "str" and isinstance(value, str):
        return value
    elif base not in ("float", "int", "bool", "str"):
        return value  # tuples and mappings are checked where they are used
    raise ValueError(f"{kind} field {name!r} must be {annotation}, got {value!r} ({type(value).__name__})")
