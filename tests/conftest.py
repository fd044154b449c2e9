import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture
def degsr_cmd():
    """The installed console script, run the way a user runs it (falls back to -m degsr)."""
    exe = Path(sys.executable).with_name("degsr")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "degsr"]
