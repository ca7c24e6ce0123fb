"""The example app (examples/flask_app/app.py), failing at boot while $BOOT_FAULT exists.

A worker importing this module while the file named by BOOT_FAULT exists exits with
status 1 before it is ready, as an app does whose dependency is missing at start (a
crash loop, not Gunicorn's boot error, which halts the instance). Deleting the file is
the fix. Run from examples/flask_app with tests/apps on PYTHONPATH.
"""

import os
import sys

if os.path.exists(os.environ.get("BOOT_FAULT", "")):
    print(f"boot_fault_app: {os.environ['BOOT_FAULT']} exists: exiting before ready",
          file=sys.stderr, flush=True)
    sys.exit(1)

from app import app  # noqa: E402

__all__ = ["app"]
