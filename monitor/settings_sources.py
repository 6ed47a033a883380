"""Where settings come from: the pydantic-settings sources ``Settings`` reads, highest priority first.

1. environment variables ``MONITOR_<SECTION>__<KEY>`` (``__`` nests),
2. secret files in ``$CREDENTIALS_DIRECTORY`` (systemd ``LoadCredential=``),
   named like the variables, e.g. ``monitor_mqtt__password``,
3. the YAML file's mapping.

The environment and the credential files are read as pydantic-settings reads
them, made safe: their camera keys match the file's cameras in any case, and a
value that is not the JSON its key needs is a ``ConfigError`` naming the
variable or file and what it must hold. This module knows no particular
settings class (``Settings`` comes in as ``settings_cls``): ``monitor.settings``
hands its sources over with ``sources``, and ``monitor.configfile`` parses the
YAML file and builds ``Settings`` within ``reading``.
"""

from __future__ import annotations

import contextlib
import json
import os
import types
import typing
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

from pydantic import BaseModel
from pydantic_settings import BaseSettings, NestedSecretsSettingsSource, PydanticBaseSettingsSource
from pydantic_settings.exceptions import SettingsError

from monitor.errors import ConfigError

ENV_PREFIX = "MONITOR_"

_YAML_DATA: ContextVar[dict[str, Any]] = ContextVar("_YAML_DATA", default={})  # noqa: B039
_SECRETS_DIR: ContextVar[Path | None] = ContextVar("_SECRETS_DIR", default=None)


@contextlib.contextmanager
def reading(data: dict[str, Any], secrets_dir: Path | None) -> Iterator[None]:
    """Within it, a settings class built here reads ``data`` as the YAML file's and ``secrets_dir``'s files.

    Args:
        data: The YAML file's top-level mapping.
        secrets_dir: Where credential files live (systemd's ``$CREDENTIALS_DIRECTORY``), or None.
    """
    yaml_token = _YAML_DATA.set(data)
    secrets_token = _SECRETS_DIR.set(secrets_dir)
    try:
        yield
    finally:
        _YAML_DATA.reset(yaml_token)
        _SECRETS_DIR.reset(secrets_token)


def sources(
    settings_cls: type[BaseSettings],
    init_settings: PydanticBaseSettingsSource,
    env_settings: PydanticBaseSettingsSource,
    file_secret_settings: PydanticBaseSettingsSource,
) -> tuple[PydanticBaseSettingsSource, ...]:
    """The sources of ``settings_customise_sources``: arguments, environment, credential files, YAML file."""
    secrets_dir = _SECRETS_DIR.get()
    secrets = _MatchedSource(
        settings_cls,
        lambda: NestedSecretsSettingsSource(
            file_secret_settings,
            secrets_dir=secrets_dir,
            secrets_dir_missing="ok",
            secrets_nested_delimiter="__",
        ),
        _secret_entries(secrets_dir),
    )
    environment = _MatchedSource(settings_cls, lambda: env_settings, _environment_entries())
    return (init_settings, environment, secrets, _YamlSource(settings_cls))


def unknown_variables(settings_cls: type[BaseSettings]) -> list[str]:
    """A line per ``MONITOR_`` variable whose first part names no section of ``settings_cls``.

    pydantic-settings ignores such variables; we do not.
    """
    sections = set(settings_cls.model_fields)
    stray = sorted(
        name
        for name in os.environ
        if name.upper().startswith(ENV_PREFIX)
        and name[len(ENV_PREFIX) :].split("__")[0].lower() not in sections
    )
    return [f"{name} (environment): unknown key" for name in stray]


class _YamlSource(PydanticBaseSettingsSource):
    """The YAML file's mapping, parsed by ``monitor.configfile`` (lowest priority)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return _YAML_DATA.get().get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_YAML_DATA.get())


@dataclass(frozen=True, slots=True)
class _Entry:
    """One variable or credential file that pydantic-settings reads.

    Attributes:
        origin: Where it came from, for messages (``MONITOR_CAMERAS (environment)``).
        name: The variable's or the file's name.
        keys: Its key path after the prefix, in lower case (``cameras__gate__url``).
        value: The variable's text, or the credential file.
    """

    origin: str
    name: str
    keys: str
    value: str | Path

    def text(self) -> str:
        """The text pydantic-settings parses (a file's, stripped, as it does)."""
        if isinstance(self.value, str):
            return self.value
        return self.value.read_bytes().decode("utf-8").strip()


def _environment_entries() -> list[_Entry]:
    return [
        _Entry(f"{name} (environment)", name, name[len(ENV_PREFIX) :].lower(), value)
        for name, value in sorted(os.environ.items())
        if name.upper().startswith(ENV_PREFIX)
    ]


def _secret_entries(secrets_dir: Path | None) -> list[_Entry]:
    if secrets_dir is None or not secrets_dir.is_dir():
        return []
    return [
        _Entry(f"{file} (credential file)", file.name, file.name[len(ENV_PREFIX) :].lower(), file)
        for file in sorted(secrets_dir.iterdir())
        if file.name.upper().startswith(ENV_PREFIX) and file.is_file()
    ]


class _MatchedSource(PydanticBaseSettingsSource):
    """The environment or the credential files, as pydantic-settings reads them, made safe.

    Camera keys are matched to the file's cameras without regard to case
    (pydantic-settings lower-cases variable names, so ``MONITOR_CAMERAS__GATE__URL``
    would otherwise make a second camera ``gate`` beside the file's ``Gate``), and a
    value that is not the JSON its key needs becomes a ``ConfigError`` naming the
    variable or file, instead of pydantic-settings' ``SettingsError``.

    Args:
        settings_cls: The settings class (``Settings``).
        make: Builds the wrapped source (reading credential files can fail, so it is built here).
        entries: The variables or files it reads, to name the one at fault.
    """

    def __init__(
        self,
        settings_cls: type[BaseSettings],
        make: Callable[[], PydanticBaseSettingsSource],
        entries: list[_Entry],
    ) -> None:
        super().__init__(settings_cls)
        self._make = make
        self._entries = entries

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        # Checked first: pydantic-settings raises for some of these and, for others (a nested
        # credential file), passes the text on, to be refused as if the YAML file were at fault.
        problems = _explain(self._entries, self.settings_cls)
        if problems:
            raise ConfigError(problems)
        try:
            source = self._make()
            source._set_current_state(self.current_state)
            source._set_settings_sources_data(self.settings_sources_data)
            data = source()
        except (SettingsError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise ConfigError([f"environment or credential files: {exc}"]) from exc
        cameras = data.get("cameras")
        if isinstance(cameras, dict):
            data["cameras"] = _match_cameras(cameras, _YAML_DATA.get().get("cameras"))
        return data


def _match_cameras(cameras: dict[str, Any], configured: Any) -> dict[str, Any]:
    """``cameras`` with each key renamed to the file's camera of that name in any case."""
    names = [name for name in configured if isinstance(name, str)] if isinstance(configured, dict) else []
    matched: dict[str, Any] = {}
    for key, value in cameras.items():
        # Variable names have no case: with Gate and gate in the file, MONITOR_CAMERAS__GATE
        # could mean either, even though pydantic-settings hands it over as "gate".
        same = [name for name in names if name.casefold() == key.casefold()]
        target = key
        if key not in names or len(same) > 1:
            if len(same) > 1:
                raise ConfigError(
                    [
                        f"cameras.{key} (environment or credential file): matches cameras "
                        f"{', '.join(same)} of the file, whose names differ only in case; rename one "
                        "(variable names carry no case)"
                    ]
                )
            target = same[0] if same else key
        if isinstance(matched.get(target), dict) and isinstance(value, dict):
            value = {**matched[target], **value}
        matched[target] = value
    return matched


def _explain(entries: list[_Entry], settings_cls: type[BaseSettings]) -> list[str]:
    """One line per variable or file that is not the JSON (or the UTF-8) its key needs."""
    problems = []
    for entry in entries:
        origin = entry.origin
        try:
            text = entry.text()
        except UnicodeDecodeError as err:
            problems.append(f"{origin}: not UTF-8 at byte {err.start}")
            continue
        except OSError:
            continue
        expected = _expected_json(settings_cls, entry.keys.split("__"), entry.name)
        if expected is None:
            continue
        try:
            json.loads(text)
        except ValueError as err:
            # The text itself is never shown: it may hold a camera's password.
            why = f"{err.msg} at character {err.pos}" if isinstance(err, json.JSONDecodeError) else str(err)
            problems.append(f"{origin}: expected {expected}; got text that is not JSON ({why})")
    return problems


def _unwrap(annotation: Any) -> Any:
    """``X`` of ``X | None`` and of ``Annotated[X, ...]``."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            rest = [arg for arg in get_args(annotation) if arg is not type(None)]
            if len(rest) != 1:
                return annotation
            annotation = rest[0]
        else:
            return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _expected_json(settings_cls: type[BaseSettings], keys: list[str], name: str) -> str | None:
    """What a variable for key path ``keys`` must hold when pydantic-settings reads it as JSON, or None."""
    annotation: Any = settings_cls
    for key in keys:
        annotation = _unwrap(annotation)
        if _is_model(annotation):
            field = annotation.model_fields.get(key)
            if field is None:
                return None
            annotation = field.annotation
        elif get_origin(annotation) is dict:
            annotation = get_args(annotation)[1]
        else:
            return None
    annotation = _unwrap(annotation)
    origin = get_origin(annotation)
    case = str.upper if name.isupper() else str.lower  # files are named in lower case
    if origin in (list, tuple, set):
        item = _unwrap(get_args(annotation)[0]) if get_args(annotation) else None
        return 'a JSON list such as ["person", "deer"]' if item is str else "a JSON list"
    if _is_model(annotation):
        first = next(iter(annotation.model_fields))
        return f'a JSON object such as {{"{first}": ...}}, or one variable per key ({name}__{case(first)})'
    if origin is dict:
        entry = case("<name>")
        return f'a JSON object such as {{"<name>": ...}}, or one variable per entry ({name}__{entry})'
    return None
