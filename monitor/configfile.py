"""Loading the configuration: the YAML file, then ``Settings`` built from it, the environment and credentials.

``load_settings`` is the one way the daemon's settings are built (``cli.py``
calls it at start-up and on every reload). It turns every problem with what it
reads (a file that is not UTF-8 or not YAML, nesting deeper than any setting, a
repeated key, a variable that names no section, a variable or credential file
that is not the JSON its key needs, pydantic's ``ValidationError``) into a
``ConfigError`` whose lines name each key path or variable and, where it came
from the YAML file, its line.

``monitor.settings`` holds the model this builds (``Settings`` and its
sections) and knows nothing of files; ``monitor.settings_sources`` holds the
pydantic-settings sources that read the environment, the credential files and
the mapping parsed here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from monitor import settings_sources
from monitor.errors import ConfigError
from monitor.settings import Settings

#: Deepest nesting of a configuration file: no setting needs more than 6 levels, and
#: PyYAML's composer recurses once per level (20,000 levels raise RecursionError).
MAX_DEPTH = 32


class _TooDeep(yaml.YAMLError):
    """The file nests deeper than ``MAX_DEPTH``."""

    def __init__(self, mark: yaml.Mark) -> None:
        super().__init__(f"nested deeper than {MAX_DEPTH} levels")
        self.problem_mark = mark


class _Loader(yaml.SafeLoader):
    """``SafeLoader`` that refuses nesting deeper than ``MAX_DEPTH`` and names the line of a bad scalar.

    PyYAML's composer recurses once per level (20,000 levels raise ``RecursionError``),
    and its constructors raise bare ``ValueError`` for ``2020-02-30`` or an int of 5,000
    digits; both would escape as something other than a ``YAMLError``.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self._depth >= MAX_DEPTH:
            raise _TooDeep(self.peek_event().start_mark)  # type: ignore[no-untyped-call]
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read this {node.tag.rsplit(':', 1)[-1]}: {exc}", node.start_mark
            ) from exc


def _parse(path: Path, raw: bytes) -> tuple[Any, yaml.Node | None]:
    """The file's data and its node tree (for line numbers), or ConfigError."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            [f"{path} (line {line}): not UTF-8 at byte {exc.start} (0x{raw[exc.start]:02x}); save as UTF-8"]
        ) from exc
    loader: _Loader | None = None
    try:
        loader = _Loader(text)  # the reader checks every character here
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise ConfigError(
            [f"{path} (line {line}): not valid YAML: character U+{exc.character:04X} is not allowed"]
        ) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        problem = getattr(exc, "problem", None) or str(exc)
        kind = "refused" if isinstance(exc, _TooDeep) else "not valid YAML"
        raise ConfigError([f"{path} ({where}): {kind}: {problem}"]) from exc
    finally:
        if loader is not None:
            loader.dispose()
    repeated = _repeated_keys(root)
    if repeated:
        raise ConfigError(repeated)
    return data, root


def _repeated_keys(root: yaml.Node | None) -> list[str]:
    """A line per key that a mapping repeats (YAML would keep only the last), in file order."""
    found: list[tuple[int, str]] = []
    seen: set[int] = set()
    # A stack, not recursion: through aliases a tree can be deeper than its text.
    stack: list[tuple[yaml.Node, str]] = [(root, "")] if root is not None else []
    while stack:
        node, path = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            lines: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                child = f"{path}.{key.value}" if path else str(key.value)
                if isinstance(key, yaml.ScalarNode):
                    line = key.start_mark.line + 1
                    first = lines.get((key.tag, key.value))
                    if first is None:
                        lines[(key.tag, key.value)] = line
                    else:
                        where = f"line {line}, twice" if first == line else f"lines {first} and {line}"
                        found.append((line, f"{child} ({where}): repeated key; say it once"))
                stack.append((value, child))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, f"{path}.{i}") for i, item in enumerate(node.value))
    return [message for _, message in sorted(found)]


def load_settings(path: Path, secrets_dir: Path | None = None, **overrides: Any) -> Settings:
    """Build ``Settings`` from a YAML file, the environment and secret files.

    Args:
        path: The YAML configuration file.
        secrets_dir: Where secret files live (systemd's ``$CREDENTIALS_DIRECTORY``).
        **overrides: Values that win over every source (used by tests and the CLI).

    Raises:
        ConfigError: With one line per problem, naming its key path (or variable, or file).
            Nothing else: a reload that raised anything else would end the daemon.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from exc
    data, root = _parse(path, raw)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of sections, got {type(data).__name__}"])
    stray = settings_sources.unknown_variables(Settings)
    if stray:
        raise ConfigError(stray)
    try:
        with settings_sources.reading(data, secrets_dir):
            return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError([_describe(err, root) for err in exc.errors()]) from exc


def _describe(err: Any, root: yaml.Node | None) -> str:
    loc = [str(p) for p in err["loc"]]
    if loc and loc[-1] == "[key]":  # a bad dict key (a camera or zone name): the key is the place
        loc.pop()
    path = ".".join(loc) or "(top level)"
    # A missing key points at its parent section; anything else only at itself
    # (an unknown key from the environment is not on any line of the file).
    line = _yaml_line(root, loc, partial=err["type"] == "missing")
    where = f" (line {line})" if line else ""
    message = err["msg"]
    if err["type"] == "extra_forbidden":
        message = "unknown key"
    elif err["type"] == "missing":
        message = "required key is missing"
    return f"{path}{where}: {message}"


def _yaml_line(node: yaml.Node | None, loc: list[str], partial: bool) -> int | None:
    """The 1-based line of the key at ``loc``; with ``partial``, of its deepest ancestor in the file."""
    line = None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            pair = next(((k, v) for k, v in node.value if getattr(k, "value", None) == key), None)
            if pair is None:
                return line if partial else None
            line, node = pair[0].start_mark.line + 1, pair[1]
        elif isinstance(node, yaml.SequenceNode) and key.isdigit() and int(key) < len(node.value):
            node = node.value[int(key)]
            line = node.start_mark.line + 1
        else:
            return line if partial else None
    return line
