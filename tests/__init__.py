"""Tests in two tiers: unit/ (no Ray cluster, no DeepSpeed engine; about 1.5 minutes) and
e2e/ (Ray, DeepSpeed, `ray job submit`, the scripts). Shared fixtures: conftest.py."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
