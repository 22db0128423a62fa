"""`harmonia-healthcheck [URL]`: exit 0 when the cache answers a correct nix-cache-info.

For the health timer: one line on failure saying why, nothing else. Standard library only, so
it works wherever the package is installed.
"""

from __future__ import annotations

import http.client
import sys
import urllib.parse

DEFAULT_URL = "http://127.0.0.1:5000/nix-cache-info"


def check(url: str, timeout: float = 10.0) -> str | None:
    """None when healthy, else the reason."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"not an http(s) URL: {url}"
    conn_type = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = conn_type(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("GET", parts.path or "/nix-cache-info", headers={"User-Agent": "harmonia-healthcheck"})
        resp = conn.getresponse()
        body = resp.read(65536)
    except OSError as exc:
        return f"{url}: {exc.strerror or exc}"
    except http.client.HTTPException as exc:
        return f"{url}: bad HTTP response: {exc!r}"
    finally:
        conn.close()
    if resp.status != 200:
        return f"{url}: HTTP {resp.status}"
    fields = dict(
        line.split(": ", 1) for line in body.decode("utf-8", "replace").splitlines() if ": " in line
    )
    if "StoreDir" not in fields:
        return f"{url}: the answer has no StoreDir: not a Nix binary cache"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print("usage: harmonia-healthcheck [URL]   (default " + DEFAULT_URL + ")")
        return 0
    url = argv[0] if argv else DEFAULT_URL
    problem = check(url)
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    print(f"healthy: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
