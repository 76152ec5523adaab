"""The broker transports that settings accept are the ones kombu and taskrail register."""

from __future__ import annotations

from kombu.transport import TRANSPORT_ALIASES

import orchestration.messaging.dispatch  # noqa: F401  (registers taskrail's transports)
from orchestration import urls


def test_settings_know_every_transport_kombu_knows() -> None:
    # Given kombu's registry after taskrail registered its own transports
    # Then the domain's copy (it checks a broker URL without importing kombu) is the same
    assert frozenset(TRANSPORT_ALIASES) == urls.TRANSPORT_ALIASES
