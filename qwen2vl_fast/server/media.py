"""Where a request's images and videos may come from.

- `data:` URIs (base64): always. Images go to the engine as the URI (the processor decodes it); videos are
  written to a temporary file that lives until the request has been preprocessed (`MediaFiles.close`).
- local paths and `file://` URIs: only with `--allowed-local-media-path DIR`, and only for files inside DIR once
  symlinks and `..` are resolved; relative paths are taken relative to DIR. The engine gets the resolved path.
- `http://` / `https://`: refused, the server never fetches anything.
- any other scheme: refused.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import tempfile
from typing import Optional
from urllib.parse import unquote, urlparse

from .errors import bad_request

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")
_VIDEO_SUFFIXES = {"mp4": ".mp4", "webm": ".webm", "quicktime": ".mov", "x-matroska": ".mkv", "x-msvideo": ".avi",
                   "mpeg": ".mpg", "ogg": ".ogv", "x-flv": ".flv", "3gpp": ".3gp"}


def _short(url: str, n: int = 60) -> str:
    return url if len(url) <= n else url[:n] + "..."


class MediaFiles:
    """Temporary files written for one request (videos sent as data URIs); close() removes them."""

    def __init__(self):
        self.paths: list = []

    def write(self, data: bytes, suffix: str) -> str:
        fd, path = tempfile.mkstemp(prefix="qwen2vl_fast_media_", suffix=suffix)
        self.paths.append(path)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return path

    def close(self):
        for path in self.paths:
            try:
                os.unlink(path)
            except OSError:
                pass
        self.paths.clear()


class MediaPolicy:
    def __init__(self, allowed_local_media_path: Optional[str] = None):
        self.root = None
        if allowed_local_media_path is not None:
            root = os.path.realpath(os.fspath(allowed_local_media_path))
            if not os.path.isdir(root):
                raise ValueError(f"allowed_local_media_path {allowed_local_media_path!r} is not a directory")
            self.root = root

    def resolve(self, url, kind: str, param: str, files: MediaFiles):
        """The source the engine gets for one image / video URL, or a 400 saying why it is refused."""
        if not isinstance(url, str) or not url.strip():
            raise bad_request(f"{param} must be a non-empty string (a data: URI or a local path)", param)
        url = url.strip()
        scheme = _SCHEME.match(url)
        scheme = scheme.group(1).lower() if scheme else ""
        if scheme == "data":
            return self._data(url, kind, param, files)
        if scheme in ("http", "https"):
            raise bad_request(f"{param}: remote URLs are not fetched by this server ({_short(url)}); send the "
                              f"{kind} inline as a base64 data: URI"
                              + ("" if self.root else " (or start the server with --allowed-local-media-path "
                                                      "and send a local path)"), param, "remote_media_refused")
        if scheme == "file":
            parsed = urlparse(url)
            if parsed.netloc not in ("", "localhost"):
                raise bad_request(f"{param}: file:// URI with a host ({parsed.netloc!r}) is not a local file", param)
            return self._local(unquote(parsed.path), kind, param)
        if scheme:
            raise bad_request(f"{param}: unsupported URL scheme {scheme!r} ({_short(url)}); send a base64 data: "
                              f"URI", param)
        return self._local(url, kind, param)

    def _data(self, url: str, kind: str, param: str, files: MediaFiles):
        meta, comma, payload = url.partition(",")
        meta = meta.lower()
        mime = meta[5:].split(";")[0]
        if not comma or not meta.endswith(";base64") or not mime.startswith(f"{kind}/"):
            raise bad_request(f"{param}: a data URI must be 'data:{kind}/<type>;base64,<data>', got "
                              f"{_short(url, 40)!r}", param, "invalid_data_uri")
        if kind == "image":
            return url  # the engine's image loader decodes it (and says what is wrong with the bytes)
        try:
            raw = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError) as e:
            raise bad_request(f"{param}: invalid base64 in the data URI ({e})", param, "invalid_data_uri") from None
        if not raw:
            raise bad_request(f"{param}: the data URI is empty", param, "invalid_data_uri")
        return files.write(raw, _VIDEO_SUFFIXES.get(mime.split("/", 1)[1], ".bin"))

    def _local(self, path: str, kind: str, param: str) -> str:
        if self.root is None:
            raise bad_request(f"{param}: local {kind} paths are disabled on this server ({_short(path)}); send "
                              f"the {kind} as a base64 data: URI, or start the server with "
                              f"--allowed-local-media-path DIR", param, "local_media_refused")
        if "\x00" in path:
            raise bad_request(f"{param}: the path holds a NUL byte", param)
        real = os.path.realpath(os.path.join(self.root, path))  # an absolute path stays itself
        if os.path.commonpath([real, self.root]) != self.root:
            raise bad_request(f"{param}: {path!r} is outside the allowed local media directory", param,
                              "local_media_refused")
        if not os.path.isfile(real):
            raise bad_request(f"{param}: no such {kind} file {path!r} in the allowed local media directory",
                              param, "media_not_found")
        return real
