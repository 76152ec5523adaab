"""The ``backend`` fixture of the people's side tests: the API on the embedded SQLite and
on the real PostgreSQL with a Redis broker (:mod:`tests.unit.domain.people_support`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.domain.people_support import BACKENDS, Backend, open_backend


@pytest.fixture(params=BACKENDS)
def backend(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Backend]:
    """The process-wide API client on each back-end in turn, fresh and empty."""
    with open_backend(request.param, request, tmp_path, monkeypatch) as opened:
        yield opened
