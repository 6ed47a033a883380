"""Names the configuration gives to cameras, labels and zones, as pydantic types.

Each name becomes an MQTT topic level and a Prometheus label value, so each is
checked here, once, with a message that says what is allowed. The settings
sections (``monitor.settings``, ``monitor.objects_settings``) declare their
names with these types.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Annotated

from pydantic import AfterValidator

CAMERA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: Longest label or zone name: each is an MQTT topic level or a metric label value.
NAME_MAX = 64
#: Unicode categories no topic level or label may hold: control characters, lone
#: surrogates (a variable that was not UTF-8), line and paragraph separators.
_NAME_BAD_CATEGORIES = ("Cc", "Cs", "Zl", "Zp")


def _shown(value: str) -> str:
    """``value`` quoted for a message, cut short when long."""
    return repr(value) if len(value) <= NAME_MAX + 16 else repr(value[:NAME_MAX]) + "..."


def _topic_name(value: str) -> str:
    """A label or zone name that MQTT topics and Prometheus labels can carry, else ValueError."""
    bad = sorted({c for c in value if c in "+#/" or unicodedata.category(c) in _NAME_BAD_CATEGORIES})
    if not value.strip():
        reason = "it is empty"
    elif len(value) > NAME_MAX:
        reason = f"it has {len(value)} characters"
    elif bad:
        reason = "it contains " + ", ".join(repr(c) for c in bad)
    else:
        return value
    raise ValueError(
        f"{_shown(value)} cannot be an MQTT topic level or a metric label ({reason}): use 1-{NAME_MAX} "
        "characters without + # / or control characters (spaces, _, - and letters of any script are fine)"
    )


def _camera_name(value: str) -> str:
    if not CAMERA_NAME.match(value):
        raise ValueError(
            f"camera name {_shown(value)} must be 1-64 letters, digits, '_' or '-' "
            "(it is used in MQTT topics and metric labels)"
        )
    return value


#: A label (``objects.track``, ``model.labels`` values ...) or a zone name.
TopicName = Annotated[str, AfterValidator(_topic_name)]
CameraName = Annotated[str, AfterValidator(_camera_name)]
