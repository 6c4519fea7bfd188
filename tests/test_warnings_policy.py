"""Warnings are evidence: the test configuration may mute a known third-party warning, never ours.

The suite used to ignore every DeprecationWarning, UserWarning and FutureWarning, so a deprecation
on the auto_LiRPA bridge's path (the warning before the break) or one of our own never showed.
`warnings.catch_warnings(record=True)` keeps the active filters (pyproject's), so what it records
is what a test run shows.
"""
import warnings

import pytest

from tests.conftest import REPO

tomllib = pytest.importorskip("tomllib")  # Python 3.11+


@pytest.mark.parametrize("category", [DeprecationWarning, FutureWarning, UserWarning, PendingDeprecationWarning])
@pytest.mark.parametrize("module", ["pipeline.certify.bounds", "pipeline.lirpa_compat", "auto_LiRPA.bound_general"])
def test_our_and_the_bridges_warnings_are_shown(category, module):
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit("a warning worth reading", category, "somewhere.py", 1, module=module)
    assert [w.category for w in caught] == [category]


def test_every_muted_warning_is_named_by_message_and_module():
    filters = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["filterwarnings"]
    for entry in filters:
        action, message, category, module = (entry.split(":") + ["", "", ""])[:4]
        if action == "ignore":
            assert message and module and not module.startswith(("pipeline", "auto_LiRPA", "tests")), entry


def test_the_known_mlflow_warning_stays_muted():
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit("The ``noload`` loader strategy is deprecated and will be removed", DeprecationWarning,
                               "sqlalchemy_store.py", 327, module="mlflow.store.tracking.sqlalchemy_store")
    assert caught == []
