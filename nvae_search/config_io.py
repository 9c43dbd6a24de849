"""Safe YAML reading and the one error type users see for bad config files.

Kept free of torch so that recipes and spaces can be validated on any machine.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .rundir import RESOLVED_RECIPE
from .schema.ops import OPS

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


class _DuplicateKey(Exception):
    def __init__(self, path: str, reason: str) -> None:
        super().__init__(reason)
        self.path, self.reason = path, reason


class _StrictLoader(yaml.SafeLoader):
    """The safe loader, refusing a mapping that repeats a key (PyYAML keeps the last value without a word).

    Keys brought in by a merge (``<<: *base``) may be overridden: that is what merges are for.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.paths: dict[int, str] = {}  # id(mapping node) -> its dotted path, filled before construction

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            self._check_duplicates(node)
        return super().construct_mapping(node, deep=deep)

    def _check_duplicates(self, node: yaml.MappingNode) -> None:
        first: dict[Any, yaml.Mark] = {}
        for key_node, _value in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue  # merges may be overridden; complex keys are refused by the schema anyway
            key = self.construct_object(key_node)  # constructed, so that 1 and 1.0 (one dict key) also clash
            if key not in first:
                first[key] = key_node.start_mark
                continue
            prefix = self.paths.get(id(node), "")
            raise _DuplicateKey(
                f"{prefix}.{key_node.value}" if prefix else str(key_node.value),
                f"duplicate key {key!r}: {_where(first[key], key_node.start_mark)} "
                "(remove one: YAML would silently keep the last)",
            )


def _where(first: yaml.Mark, again: yaml.Mark) -> str:
    if first.line == again.line:  # a flow mapping: the columns tell the two apart
        return f"first at line {first.line + 1}, column {first.column + 1}, again at column {again.column + 1}"
    return f"first at line {first.line + 1}, again at line {again.line + 1}"


def _mapping_paths(node: yaml.Node, path: str, out: dict[int, str]) -> None:
    """Dotted path of every mapping node (the first path that reaches it, for nodes shared by aliases)."""
    if id(node) in out:
        return
    if isinstance(node, yaml.MappingNode):
        out[id(node)] = path
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else "?"
            _mapping_paths(value, f"{path}.{name}" if path else str(name), out)
    elif isinstance(node, yaml.SequenceNode):
        out[id(node)] = path
        for i, item in enumerate(node.value):
            _mapping_paths(item, f"{path}.{i}" if path else str(i), out)


def _circular_node(node: yaml.Node, open_nodes: set[int], done: set[int]) -> yaml.Node | None:
    """A node that contains itself through an alias (``a: &a [*a]``), which would load as a circular object."""
    key = id(node)
    if key in done:
        return None
    if key in open_nodes:
        return node
    open_nodes.add(key)
    children: list[yaml.Node] = []
    if isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    for child in children:
        found = _circular_node(child, open_nodes, done)
        if found is not None:
            return found
    open_nodes.discard(key)
    done.add(key)
    return None


def parse_yaml_text(text: str, source: str) -> Any:
    """Parse YAML with the safe loader only, rejecting repeated keys and trees that expand past a fixed bound."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_EXPANDED_NODES:
            raise ConfigError(source, [("", f"the YAML expands to more than {MAX_EXPANDED_NODES} nodes (alias bomb?)")])
        loop = _circular_node(node, set(), set())
        if loop is not None:
            line = loop.start_mark.line + 1
            raise ConfigError(source, [("", f"line {line}: an alias refers to a node that contains it (circular)")])
        _mapping_paths(node, "", loader.paths)
        return loader.construct_document(node)
    except _DuplicateKey as exc:
        raise ConfigError(source, [(exc.path, exc.reason)]) from None
    except RecursionError:
        raise ConfigError(source, [("", "the YAML is nested too deeply")]) from None
    except yaml.YAMLError as exc:  # also python/object tags, which the safe loader refuses
        raise ConfigError(source, [("", f"not valid YAML: {_one_line(exc)}")]) from None
    finally:
        loader.dispose()


def read_yaml_file(path: str | os.PathLike[str]) -> Any:
    p = Path(path)
    if not p.exists():
        raise ConfigError(str(p), [("", "file not found")])
    if p.is_dir():
        hint = f" (a run directory: its recipe is {p / RESOLVED_RECIPE})" if (p / RESOLVED_RECIPE).is_file() else ""
        raise ConfigError(str(p), [("", f"is a directory, expected a YAML file{hint}")])
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(str(p), [("", "not a UTF-8 text file")]) from None
    data = parse_yaml_text(text, str(p))
    if data is None:
        # Else an empty recipe would be the all-defaults recipe (a 200-epoch run) and a space a confusing error.
        raise ConfigError(str(p), [("", "the file is empty (only comments, blank lines or null)")])
    return data


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


def _clean_location(loc: Sequence[Any]) -> list[str]:
    """Drop the branch names pydantic inserts into locations (union members, discriminator tags)."""
    parts = [str(part) for part in loc if not _is_union_tag(part)]
    # A discriminated op reports `cells.normal_enc.0.res_bnswish.kernel`; the tag is not part of the file's path.
    return [p for i, p in enumerate(parts) if not (p in OPS and i > 0 and parts[i - 1].isdigit())]


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


def get_dotted(tree: Any, parts: list[str]) -> Any:
    """The value at ``parts`` (``["a", "b", "0"]``) in a nested dict/list tree, or None when there is none."""
    node = tree
    for part in parts:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return None
    return node


def parse_override(item: str) -> tuple[str, Any]:
    """``model.use_se=false`` → ``("model.use_se", False)``; the value is read as YAML."""
    if "=" not in item:
        raise ConfigError("--set", [(item, "expected dotted.key=value")])
    key, raw = item.split("=", 1)
    return key.strip(), parse_yaml_text(raw, f"--set {key}") if raw.strip() else None


BUDGET_KEYS = ("train.epochs", "train.steps", "train.minutes")


def clear_other_budgets(overrides: dict[str, Any]) -> dict[str, Any]:
    """``--set train.steps=10`` (with or without ``train.minutes``) replaces the recipe's budget: the budget keys not
    set are cleared. Sets that only clear budget keys (``train.minutes=null``) leave the others as they are."""
    if all(overrides.get(key) is None for key in BUDGET_KEYS):
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


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a JSON-lines log. A torn last line (a kill or a full disk in the middle of a write) is
    skipped; a damaged line before it is an error naming the file and the line."""
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif number < len(lines):
            raise ConfigError(str(path), [(f"line {number}", "not a JSON object: the file is damaged")])
    return rows


def read_json_mapping(path: str | os.PathLike[str], required: Sequence[str] = ()) -> dict[str, Any]:
    """A JSON file holding one object with string values under ``required``; anything else is a ConfigError."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(str(p), [("", "file not found")]) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(str(p), [("", f"not valid JSON (truncated or damaged?): {_one_line(exc)}")]) from None
    if not isinstance(data, dict):
        raise ConfigError(str(p), [("", f"expected a JSON object, got {type(data).__name__}")])
    problems = [(key, "missing") for key in required if key not in data]
    problems += [
        (key, f"expected a non-empty string, got {data[key]!r}")
        for key in required
        if key in data and not (isinstance(data[key], str) and data[key])
    ]
    if problems:
        raise ConfigError(str(p), problems)
    return data


def differences(old: Any, new: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """Where two trees of mappings, lists and values differ: ``(dotted path, old, new)`` at the deepest level
    that still lines up (a list of another length differs as a whole)."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(old) + [k for k in new if k not in old]
        return [d for k in keys for d in differences(old.get(k), new.get(k), f"{path}.{k}" if path else str(k))]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new, strict=True)) for d in differences(a, b, f"{path}.{i}")]
    return [] if old == new and type(old) is type(new) else [(path, old, new)]


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
