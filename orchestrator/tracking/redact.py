"""Credentials inside URIs (`https://user:password@host`, `https://<token>@host`) replaced by `***`.

Pure and import-light, so the CLI can pass every error line through it before anything heavy loads.
"""

from __future__ import annotations

import re

_URI_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


def redact(text: str) -> str:
    """`text` with the user-info part of every URI replaced by `***`: safe to print, log or store."""
    return _URI_USERINFO.sub(r"\g<scheme>***@", text)
