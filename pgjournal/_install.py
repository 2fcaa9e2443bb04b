"""How to add an extra to *this* installation of pgjournal.

pgjournal is installed from a clone or a path more often than from an index,
and ``pip install 'pgjournal[x]'`` then fails with "No matching distribution".
A hint names the path pip recorded at install time (``direct_url.json``,
PEP 610) when there is one.
"""

from __future__ import annotations

import json
from importlib import metadata
from urllib.parse import urlparse
from urllib.request import url2pathname


def extra_hint(extra: str) -> str:
    """The pip command that installs ``pgjournal[extra]`` where this one came from."""
    try:
        info = json.loads(metadata.distribution("pgjournal").read_text("direct_url.json") or "{}")
    except (metadata.PackageNotFoundError, ValueError):
        info = {}
    url = info.get("url", "") if isinstance(info, dict) else ""
    if url.startswith("file://"):
        path = url2pathname(urlparse(url).path)
        editable = "-e " if info.get("dir_info", {}).get("editable") else ""
        return f"pip install {editable}'{path}[{extra}]'"
    return f"pip install 'pgjournal[{extra}]'"
