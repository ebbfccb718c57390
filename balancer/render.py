"""Render haproxy.cfg from a `ClusterDescription` (Jinja2, StrictUndefined)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import jinja2

from balancer.cluster import BACKEND_NAME, ClusterDescription

__all__ = ["TEMPLATE_NAME", "render_config", "write_config"]

TEMPLATE_NAME = "haproxy.cfg.j2"
_TEMPLATES = Path(__file__).with_name("templates")


def _environment(templates: Path) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates)),
        undefined=jinja2.StrictUndefined,  # a misspelt variable is an error, not an empty string
        autoescape=False,  # noqa: S701 - the output is haproxy.cfg, not HTML; inputs are validated
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render_config(
    cluster: ClusterDescription, *, template: str = TEMPLATE_NAME, templates_dir: Path | None = None
) -> str:
    """Return the haproxy.cfg text for `cluster`.

    Raises `jinja2.UndefinedError` if the template uses a name it was not given.
    """
    env = _environment(templates_dir or _TEMPLATES)
    return env.get_template(template).render(cluster=cluster, backend=BACKEND_NAME)


def write_config(text: str, out: Path) -> None:
    """Write atomically (temp file + rename) so a reload never reads half a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o640)  # may hold the deployment key
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
