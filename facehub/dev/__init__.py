"""Developer tools: benchmarks, the demo and throwaway servers, shared with ``tests/``.

They ship in the package but their extra dependencies (moto's S3 server, boto3)
come with the ``bench`` extra: ``pip install 'facehub[bench]'``. A tool that
lacks one says so by name instead of failing on an import.
"""

from __future__ import annotations

from importlib.util import find_spec

EXTRA = "bench"


class MissingExtra(RuntimeError):
    pass


def require_extra(*modules: str) -> None:
    """Raise :class:`MissingExtra` naming the extra when any of ``modules`` is not installed."""
    missing = [name for name in modules if find_spec(name) is None]
    if missing:
        raise MissingExtra(f"needs the '{EXTRA}' extra (missing: {', '.join(missing)}): "
                           f"pip install 'facehub[{EXTRA}]'")
