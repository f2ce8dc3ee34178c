"""Shared test helpers that are plain modules in this folder (``report_cases``) are importable: with
``--import-mode=importlib`` pytest puts no test folder on ``sys.path``. The package under test is still the
installed one (its sources are not in this folder)."""

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
