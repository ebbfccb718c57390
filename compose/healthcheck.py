#!/usr/bin/env python3
"""Docker HEALTHCHECK: GET the health URL the entrypoint recorded for this container's role.

Exit 0 when it answers 200, 1 otherwise (Docker's contract). The gateway answers 503 while it is
not logged in to AMI, a node while it has no broker or is draining: both are "unhealthy" on purpose.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path


def main() -> int:
    marker = Path(os.environ.get("CMS_RUN_DIR", "/run/cms")) / "health-url"
    try:
        url = marker.read_text(encoding="utf-8").strip()
    except OSError:
        print("no health URL yet (container still starting)", file=sys.stderr)
        return 1
    if not url.startswith("http://127.0.0.1:"):
        print(f"refusing unexpected health URL {url!r}", file=sys.stderr)
        return 1
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback URL checked above
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
