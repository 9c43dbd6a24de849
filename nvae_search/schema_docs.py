"""The recipe reference page (``docs/recipes.md``), rendered from the recipe's JSON Schema.

Generated rather than hand-written so that it cannot drift from the schema: a test compares the committed page with
:func:`recipe_reference_markdown`, and ``nvae-search schema --markdown > docs/recipes.md`` rewrites it.

Imports neither torch nor optuna.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = ["recipe_reference_markdown"]

_HEADER = """# Recipe reference

Every field of a recipe file, section by section, with its type, default and meaning. This page is generated from the
recipe schema: `nvae-search schema --markdown > docs/recipes.md` rewrites it (a test checks that it is current), and
`nvae-search schema` prints the JSON Schema itself, for an editor's YAML language server. Unknown keys are errors.
"""

_SECTION_ORDER = ("data", "model", "train", "eval")


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _type_text(prop: Mapping[str, Any]) -> str:
    """A short human type: `int ≥ 1`, `float or null`, `"epoch" | "step"`, `list of int`, a linked section."""
    if "$ref" in prop:
        name = _ref_name(prop["$ref"])
        return f"[{name}](#{name.lower()})"
    if "anyOf" in prop or "oneOf" in prop:
        members = prop.get("anyOf") or prop.get("oneOf")
        return " or ".join(dict.fromkeys(_type_text(m) for m in members))
    if "enum" in prop:
        return " | ".join(json.dumps(v) for v in prop["enum"])
    if "const" in prop:
        return json.dumps(prop["const"])
    kind = prop.get("type")
    names = {"integer": "int", "number": "float", "boolean": "bool", "string": "str", "null": "null", "object": "map"}
    if kind == "array":
        items = prop.get("items")
        return f"list of {_type_text(items)}" if items else "list"
    text = names.get(kind, str(kind)) if kind else "any"
    bounds = [
        f"{sym} {prop[key]}"
        for key, sym in (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<"))
        if key in prop
    ]
    return " ".join([text, *bounds]) if bounds else text


def _default_text(prop: Mapping[str, Any]) -> str:
    if "default" not in prop:
        return "required"
    if isinstance(prop["default"], dict):
        return "its section's defaults"
    return "`" + json.dumps(prop["default"], ensure_ascii=False) + "`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(definition: Mapping[str, Any]) -> list[str]:
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for name, prop in definition.get("properties", {}).items():
        description = prop.get("description", "")
        rows.append(f"| `{name}` | {_cell(_type_text(prop))} | {_cell(_default_text(prop))} | {_cell(description)} |")
    return rows


def _reachable(schema: Mapping[str, Any]) -> list[str]:
    """Definition names in the order a reader meets them: sections first, then what each refers to."""
    defs = schema.get("$defs", {})
    order: list[str] = []

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            found = [_ref_name(node["$ref"])] if "$ref" in node else []
            for value in node.values():
                found.extend(refs(value))
            return found
        if isinstance(node, list):
            return [r for item in node for r in refs(item)]
        return []

    queue = [r for key in _SECTION_ORDER for r in refs(schema.get("properties", {}).get(key, {}))]
    while queue:
        name = queue.pop(0)
        if name in order or name not in defs:
            continue
        order.append(name)
        queue.extend(refs(defs[name]))
    return order + [name for name in defs if name not in order]


def recipe_reference_markdown(schema: Mapping[str, Any] | None = None) -> str:
    """Markdown for every section and sub-section of the recipe schema."""
    if schema is None:
        from .schema import recipe_json_schema

        schema = recipe_json_schema()
    lines = [_HEADER, "## Recipe (top level)", "", *_table(schema), ""]
    for name in _reachable(schema):
        definition = schema["$defs"][name]
        lines += [f"## {name}", ""]
        if definition.get("description"):
            lines += [definition["description"].strip(), ""]
        lines += [*_table(definition), ""]
    return "\n".join(lines).rstrip() + "\n"
