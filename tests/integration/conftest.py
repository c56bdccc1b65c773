"""Every test under tests/integration/ carries the ``integration`` marker: a local Ray, the S3
server on loopback, the Serve app, injected faults. ``make test-fast`` runs tests/unit only;
``-m "not integration"`` leaves these out."""

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m deselection reads the markers
def pytest_collection_modifyitems(items):
    # a conftest's hook is called with every item of the session, not only this folder's
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.integration)
