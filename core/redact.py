"""Secrets out of what lmforge shows and keeps: a URI's user info (``s3://KEY:SECRET@bucket``,
``http://user:password@host``) and the values of secret-looking query keys (``?secret_key=...``,
``&X-Amz-Signature=...``) are replaced by ``***`` wherever a URI is printed, logged to MLflow, written to a
record or a report. The URI that reaches the filesystem or the server keeps them.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"

# scheme://userinfo@ : the user info ends at the first '@' before the host; it holds no '/', '?', '#' or space.
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/?#@\s\"'<>]+)@")
# ?key=value or &key=value with a key that names a secret (access_key, secret_key, session_token,
# password, X-Amz-Signature, X-Amz-Credential, sig, token, api_key...).
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&;][^=&#\s\"'<>]*(?:secret|password|passwd|token|key|signature|sig|credential)"
    r"[^=&#\s\"'<>]*=)(?P<value>[^&#\s\"'<>]+)",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """``text`` (a URI, or any text that holds URIs) with its secrets masked."""
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m['key']}{MASK}", text)


class RedactingStream:
    """A text stream that masks secrets in what is written to it and forwards everything else
    (``isatty``, ``fileno``, ``encoding``...) to the stream it wraps."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact(text))
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def redact_console() -> None:
    """Mask secrets in everything this process prints: sys.stdout, sys.stderr and the logging handlers
    already writing to them (Ray's, MLflow's), so a URI in a message, a warning or a traceback shows no
    credentials."""
    import logging
    import sys

    originals = {}
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, RedactingStream):
            originals[id(stream)] = wrapped = RedactingStream(stream)
            setattr(sys, name, wrapped)
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):
            stream = getattr(handler, "stream", None)
            if stream is not None and id(stream) in originals:
                handler.stream = originals[id(stream)]
