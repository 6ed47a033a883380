"""Why there is no MQTT connection, in words an operator can act on.

OpenSSL and paho report failures in their own terms ("PEM lib", a bare
``OSError``, a reason code). These functions turn them into one short line
that names the setting to look at (``mqtt.tls.key_file: ...``, ``TLS error:
... (is mqtt.port a TLS listener?)``, ``unauthorized (...)``), for the log and
``/readyz``. None of them ever includes credentials.
"""

from __future__ import annotations

import re
import socket
import ssl

from paho.mqtt.reasoncodes import ReasonCode

from monitor.settings import TlsSettings

#: MQTT 3.1.1 CONNACK 4/5 and MQTT 5 0x86/0x87: bad user name or password / not authorized.
UNAUTHORIZED = (4, 5, 0x86, 0x87)
_SSL_LOCATION = re.compile(r"\s*\(_ssl\.c:\d+\)$")


def describe_tls_files(tls: TlsSettings, exc: Exception) -> str:
    """Which of the TLS files ``tls_set`` could not load, and why (OpenSSL's "PEM lib" names none)."""
    reason = _ssl_text(exc)
    try:
        ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    except (ssl.SSLError, OSError) as ca_exc:
        problem = _ssl_text(ca_exc)
        return f"mqtt.tls.ca_file: cannot load {str(tls.ca_file)!r} as PEM CA certificate(s): {problem}"
    if tls.cert_file is None or tls.key_file is None:
        return f"mqtt.tls: cannot load the CA file: {reason}"
    try:  # parses the file's certificates, without wanting a key next to them
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(tls.cert_file))
    except (ssl.SSLError, OSError) as cert_exc:
        problem = _ssl_text(cert_exc)
        return f"mqtt.tls.cert_file: cannot load {str(tls.cert_file)!r} as a PEM certificate: {problem}"
    if isinstance(exc, ssl.SSLError) and exc.reason == "KEY_VALUES_MISMATCH":
        return (
            f"mqtt.tls.key_file: {str(tls.key_file)!r} is not the private key of "
            f"mqtt.tls.cert_file {str(tls.cert_file)!r}"
        )
    return (
        f"mqtt.tls.key_file: cannot load {str(tls.key_file)!r} as the PEM private key (unencrypted) "
        f"of mqtt.tls.cert_file: {reason}"
    )


def _ssl_text(exc: Exception) -> str:
    return _SSL_LOCATION.sub("", str(exc))


def describe_refusal(reason: ReasonCode) -> str:
    """A CONNACK that refused the connection: ``unauthorized (...)`` for bad credentials."""
    text = str(reason)
    if reason.value in UNAUTHORIZED:
        return f"unauthorized ({text})"
    return text


def describe_connect_error(exc: BaseException | None) -> str:
    """A short reason for a failed TCP connect or TLS handshake; never contains credentials."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS error: certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        text = _SSL_LOCATION.sub("", str(exc.args[1] if len(exc.args) > 1 else exc))
        if exc.reason == "WRONG_VERSION_NUMBER":
            text += " (is mqtt.port a TLS listener?)"
        elif exc.reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED":
            text += " (the broker wants a client certificate: set mqtt.tls.cert_file and key_file)"
        return f"TLS error: {text}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"host not found ({exc.strerror})"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return f"connection failed: {exc}" if exc is not None else "connection failed"
