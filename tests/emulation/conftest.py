"""Fixtures of the emulation tests: the runners, built once per session and flavor."""

from __future__ import annotations

import pytest

from tests.emulation.emulator import Emulator


@pytest.fixture(scope="session", params=["asan", "tsan"])
def emulator(request: pytest.FixtureRequest) -> Emulator:
    """The runner under ASan + UBSan, then under TSan: every kernel test runs under both."""
    return Emulator.build(request.param)


@pytest.fixture(scope="session")
def plain_emulator() -> Emulator:
    """The uninstrumented runner (the shared-memory fill differential, larger shapes)."""
    return Emulator.build("plain")
