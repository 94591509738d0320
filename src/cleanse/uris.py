"""Addresses that are safe to print: credentials stripped from URIs before any log line, console
message, MLflow tag or report shows them."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

# user:password@ (or token@) inside any scheme://authority, also when embedded in longer text
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/@\s]+)@")
_SECRET_QUERY = re.compile(r"(?i)([?&](?:password|passwd|pwd|token|secret|access_key|secret_key|sig|signature)=)[^&\s]*")


def redact(text: str) -> str:
    """``text`` with every URI's user information and secret query values replaced by ``***``.

    ``https://bob:hunter2@mlflow:5000/x`` -> ``https://***@mlflow:5000/x``. Works on a bare URI and
    on a message that embeds one; text without a URI is returned unchanged.
    """
    text = _USERINFO.sub(lambda match: f"{match['scheme']}***@", str(text))
    return _SECRET_QUERY.sub(lambda match: f"{match[1]}***", text)


def has_credentials(uri: str) -> bool:
    """True when ``uri`` carries a user name or password in its authority."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return False
    return bool(parts.username or parts.password)


def without_credentials(uri: str) -> str:
    """``uri`` with its user information removed entirely (for tags and links, where ``***`` would
    only be noise)."""
    parts = urlsplit(uri)
    if not (parts.username or parts.password):
        return uri
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
