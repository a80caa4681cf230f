"""Installer tests: the fixtures and helpers live in installer_fixtures.py
(importable by the test modules under that unique name)."""

from installer_fixtures import odd_sandbox, release, sandbox  # noqa: F401  (pytest fixtures)
