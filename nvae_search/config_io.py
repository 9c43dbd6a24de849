"""Safe YAML reading and the one error type users see for bad config files.

Kept free of torch so that recipes and spaces can be validated on any machine.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# A YAML file may reuse anchors, but the tree it expands to must stay small: this bounds the
# "billion laughs" style of file, whose aliases expand exponentially once the tree is walked.
MAX_EXPANDED_NODES = 200_000


@dataclass
class ConfigError(Exception):
    """A config file that cannot be used, with every problem found in it.

    Each problem is ``(field_path, reason)``; ``field_path`` is dotted (``model.cells.normal_enc.0``)
    or empty for the whole file.
    """

    source: str
    problems: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{self.source}: invalid configuration"]
        lines += [f"  {path or '<file>'}: {reason}" for path, reason in self.problems]
        return "\n".join(lines)


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = 1  # guards against recursive aliases while the size is being computed
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(child, memo) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    else:
        size = 1
    memo[key] = min(size, MAX_EXPANDED_NODES + 1)
    return memo[key]


def parse_yaml_text(text: str, source: str) -> Any:
    """Parse YAML with the safe loader only, rejecting trees that expand past a fixed bound."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(source, [("", f"not valid YAML: {_one_line(exc)}")]) from None
    if node is None:
        return None
    if _expanded_size(node, {}) > MAX_EXPANDED_NODES:
        raise ConfigError(source, [("", f"the YAML expands to more than {MAX_EXPANDED_NODES} nodes (alias bomb?)")])
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:  # e.g. python/object tags, which the safe loader refuses
        raise ConfigError(source, [("", f"not valid YAML: {_one_line(exc)}")]) from None


def read_yaml_file(path: str | os.PathLike[str]) -> Any:
    p = Path(path)
    if not p.exists():
        raise ConfigError(str(p), [("", "file not found")])
    if p.is_dir():
        raise ConfigError(str(p), [("", "is a directory, expected a YAML file")])
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(str(p), [("", "not a UTF-8 text file")]) from None
    return parse_yaml_text(text, str(p))


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def pydantic_problems(errors: Iterable[dict[str, Any]]) -> list[tuple[str, str]]:
    """Turn pydantic's error list into ``(dotted path, reason)`` pairs without union noise."""
    problems: list[tuple[str, str]] = []
    for err in errors:
        loc = _clean_location(err.get("loc", ()))
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            msg = "unknown key (not part of the schema)"
        problems.append((".".join(loc), msg.removeprefix("Value error, ")))
    unique = list(dict.fromkeys(problems))
    # A list that fails because one item failed also reports "too short"; keep the specific error only.
    return [
        (path, msg)
        for path, msg in unique
        if not (msg.startswith("Tuple should have at least") and any(p.startswith(path + ".") for p, _ in unique))
    ]


_OP_TAGS = {"res_bnswish", "res_bnswish5", "res_elu", "res_bnelu", "mbconv"}


def _clean_location(loc: Sequence[Any]) -> list[str]:
    """Drop the branch names pydantic inserts into locations (union members, discriminator tags)."""
    parts = [str(part) for part in loc if not _is_union_tag(part)]
    # A discriminated op reports `cells.normal_enc.0.res_bnswish.kernel`; the tag is not part of the file's path.
    return [p for i, p in enumerate(parts) if not (p in _OP_TAGS and i > 0 and parts[i - 1].isdigit())]


def _is_union_tag(part: Any) -> bool:
    text = str(part)
    return text.startswith(("function-", "tagged-union[", "union[", "json-or-python[")) or text in {
        "str",
        "int",
        "list[int]",
        "tuple[int, ...]",
    }


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.0.c`` in a nested dict/list tree, creating dicts on the way."""
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            node = node[int(part)]
            continue
        if part not in node or node[part] is None:
            node[part] = [] if nxt.isdigit() else {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``model.use_se=false`` → ``("model.use_se", False)``; the value is read as YAML."""
    if "=" not in item:
        raise ConfigError("--set", [(item, "expected dotted.key=value")])
    key, raw = item.split("=", 1)
    return key.strip(), parse_yaml_text(raw, f"--set {key}") if raw.strip() else None


BUDGET_KEYS = ("train.epochs", "train.steps", "train.minutes")


def clear_other_budgets(overrides: dict[str, Any]) -> dict[str, Any]:
    """``--set train.steps=10`` alone replaces the recipe's budget: the budget keys not set are cleared."""
    given = [key for key in BUDGET_KEYS if key in overrides]
    if len(given) != 1 or overrides[given[0]] is None:
        return overrides
    return {**{key: None for key in BUDGET_KEYS}, **overrides}


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the target."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file 0600; the run is the user's, so it gets the mode open() would give it.
        os.chmod(tmp, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (setting it is not thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


def format_sequence(values: Sequence[Any]) -> str:
    return "[" + ", ".join(str(v) for v in values) + "]"
