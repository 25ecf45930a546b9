"""Logging at the bottom of the package: structlog set-up (setup.py), the ECS shape of a
line (ecs.py), redaction, and the outputs (stdout, the rotated file). Imports nothing else
of the package.

structlog is imported here first, without `rich`: structlog imports rich whenever it is
installed (it is wherever amqtt, the demo extra, is), for its console tracebacks and pretty
reprs, which cost a plain run about 5 MB of RSS and 70 ms of start-up. The service renders
every traceback itself (setup.py: `plain_traceback`, `_exception_fields`) and never asks
structlog for rich's, so structlog is made to find rich absent, as where it is not installed
(its documented fallback). rich stays importable for anybody else afterwards.
"""

from __future__ import annotations

import sys


def _import_structlog_without_rich() -> None:
    if "structlog" in sys.modules or "rich" in sys.modules:
        return  # imported already (a host program, the test run): as it is
    # A None in sys.modules makes `import rich` raise ImportError (the import system's
    # documented way to block a module), which structlog takes for "rich is not installed".
    sys.modules["rich"] = None  # type: ignore[assignment]
    try:
        import structlog  # noqa: F401, PLC0415 - the import this function exists for
    finally:
        left: object = sys.modules.get("rich", sys)  # typed as a module, but may be our None
        if left is None:
            del sys.modules["rich"]


_import_structlog_without_rich()
