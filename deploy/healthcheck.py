"""The container's HEALTHCHECK: exit 0 when this server's /readyz answers 200, else 1.

Python's standard library, as slim images have no curl. The port is the resolved [serve] port
(config.toml < TUNELOOP_SERVE_PORT), so set the port there, not with a --port flag.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

from assistant.config import ConfigError, ServeConfig, load


def main() -> int:
    try:
        port = load(ServeConfig, "serve").port
    except ConfigError as exc:
        print(f"unhealthy: configuration error: {exc}", file=sys.stderr)
        return 1
    url = f"http://127.0.0.1:{port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:  # HTTPError (503 while loading or draining) is a URLError
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
