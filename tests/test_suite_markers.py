"""The suite's speed buckets stay consistent: conftest marks only with declared markers, every kind it marks
is left out of the default selection, and the files and fixtures it marks by exist."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import conftest

KINDS = {kind for kinds in (*conftest.BY_FILE.values(), *conftest.BY_FIXTURE.values()) for kind in kinds}


def _default_expression(config: pytest.Config) -> str:
    addopts = config.getini("addopts")
    return addopts[addopts.index("-m") + 1]


def test_every_kind_is_declared_and_out_of_the_default_selection(request: pytest.FixtureRequest) -> None:
    declared = {line.split(":", 1)[0].strip() for line in request.config.getini("markers")}
    assert KINDS <= declared, KINDS - declared
    expression = _default_expression(request.config)
    assert expression.startswith("smoke or not (") and "--strict-markers" in request.config.getini("addopts")
    left_out = set(expression.removeprefix("smoke or not (").removesuffix(")").split(" or "))
    assert KINDS | {"slow"} <= left_out <= declared, (KINDS, left_out)


def test_marked_files_and_fixtures_exist() -> None:
    here = Path(__file__).parent
    assert all((here / name).is_file() for name in conftest.BY_FILE), sorted(conftest.BY_FILE)
    assert all(name in vars(conftest) for name in conftest.BY_FIXTURE), sorted(conftest.BY_FIXTURE)
    grouped = conftest.XDIST_GROUP_BY_FIXTURE
    assert all(name in vars(conftest) for name in grouped), sorted(grouped)


def test_grouped_tests_carry_their_group_under_loadgroup(request: pytest.FixtureRequest) -> None:
    """Under ``-n 2 --dist loadgroup`` (CI) xdist keeps a group on one worker by the ``@<group>`` ending of the test
    ids (conftest's ``_name_the_group``; pytest-xdist 3.8 alone no longer manages it with pytest 9.2)."""
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("checks the xdist groups: runs under -n 2 --dist loadgroup (the full command)")
    grouped = [item for item in request.session.items if any(item.iter_markers("xdist_group"))]
    if not grouped:
        pytest.skip("no grouped test in this selection")
    for item in grouped:
        [name] = {m.args[0] for m in item.iter_markers("xdist_group")}
        assert item.nodeid.endswith(f"@{name}"), item.nodeid
