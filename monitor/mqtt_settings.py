"""The ``mqtt`` section and its TLS files.

``monitor.settings`` assembles it into ``Settings`` and re-exports it:
import it from there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from monitor.topics import Topics


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsSettings(_Section):
    """TLS to the broker (paho's ``tls_set``); the files are checked even while it is disabled."""

    enabled: bool = Field(False, description="Connect with TLS (the broker's TLS listener, often 8883).")
    ca_file: Path | None = Field(
        None, description="PEM file of the CA(s) that signed the broker's certificate; none: the system's."
    )
    cert_file: Path | None = Field(None, description="Client certificate (PEM), with key_file.")
    key_file: Path | None = Field(None, description="Private key (PEM, unencrypted) of cert_file.")
    insecure: bool = Field(
        False,
        description="Skip the check that the certificate names mqtt.host (the chain is still verified).",
    )

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _readable_file(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        if not value.is_file():
            problem = "is not a file" if value.exists() else "does not exist"
            raise ValueError(f"{str(value)!r} {problem}")
        try:
            value.open("rb").close()
        except OSError as exc:
            raise ValueError(f"{str(value)!r} cannot be read: {exc.strerror or exc}") from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError(
                "set both cert_file and key_file (a client certificate needs its key), or neither"
            )
        return self


class MqttSettings(_Section):
    """The broker alerts go to."""

    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(1883, ge=1, le=65535)
    topic_prefix: str = Field("monitor", min_length=1, description="Every topic starts with this.")
    client_id: str = Field("monitor", min_length=1, max_length=128)
    username: str | None = None
    password: SecretStr | None = None
    keepalive: int = Field(30, ge=5, le=3600, description="Seconds between MQTT pings.")
    protocol: Literal["3.1.1", "5"] = Field("3.1.1", description="MQTT protocol version.")
    tls: TlsSettings = Field(default_factory=TlsSettings)

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_number(cls, value: Any) -> Any:
        # YAML reads `protocol: 5` as a number.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        Topics(value)  # the topic scheme's own check (raises ValueError)
        return value

    @model_validator(mode="after")
    def _password_needs_user(self) -> MqttSettings:
        if self.password is not None and not self.username:
            raise ValueError("mqtt.password is set but mqtt.username is not")
        return self
