"""Every test under tests/e2e/ carries the ``e2e`` marker: the jobs end to end as a user runs
them (subprocesses, the whole pipeline, ``ray job submit``, the two-node cluster, the Serve app),
minutes each. ``make test-fast`` runs tests/unit only; ``-m "not e2e"`` leaves these out."""

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m deselection reads the markers
def pytest_collection_modifyitems(items):
    # a conftest's hook is called with every item of the session, not only this folder's
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.e2e)
