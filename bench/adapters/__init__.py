"""The registry of benchmarked systems: one module per system.

Adding a system is one file in this package with an :class:`~bench.adapters.base.Adapter`
subclass, plus one line here. Modules import their library at the top, so a
peer that is not installed shows up as an ``ImportError`` and is skipped.
"""

from __future__ import annotations

import importlib

from .base import Adapter

#: name -> (module, class). Order is the order of the tables' rows.
ADAPTERS: dict[str, tuple[str, str]] = {
    "pgjournal": ("bench.adapters.pgjournal_", "PgjournalAdapter"),
    "raw": ("bench.adapters.raw", "RawAdapter"),
    "pgqueuer": ("bench.adapters.pgqueuer_", "PgqueuerAdapter"),
    "procrastinate": ("bench.adapters.procrastinate_", "ProcrastinateAdapter"),
    "dbos": ("bench.adapters.dbos_", "DbosAdapter"),
}


def load(name: str) -> type[Adapter]:
    """The adapter class of ``name``; ``ImportError`` when its library is missing."""
    module_name, cls_name = ADAPTERS[name]
    module = importlib.import_module(module_name)
    cls: type[Adapter] = getattr(module, cls_name)
    return cls
