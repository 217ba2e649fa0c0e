"""``python -m guest_shim``: the ``hyperback-shim`` command."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())
