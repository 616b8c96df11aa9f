"""The suite's scheduling (tests/conftest.py): which files form one work unit, read from their source,
and the check that every test's shared exports are seen there."""

from __future__ import annotations

import conftest  # the subject of these tests: its scheduling functions


def test_the_source_reading_sees_arguments_and_local_shadows(tmp_path):
    uses = tmp_path / "test_uses.py"
    uses.write_text("import pytest\n\n@pytest.fixture\ndef engine(exported):\n    return exported('v3')\n\n"
                    "def test_a(engine, tmp_path):\n    pass\n\ndef test_b(captured, small_export):\n    pass\n")
    shadows = tmp_path / "test_shadows.py"
    shadows.write_text("import pytest\n\n@pytest.fixture(scope='module')\ndef exported(tmp_path_factory):\n"
                       "    return 1\n\ndef test_a(exported):\n    pass\n")
    assert conftest.shared_in_source(uses) == {"exported", "captured", "small_export"}
    assert conftest.shared_in_source(shadows) == set()


def test_files_that_share_an_export_are_one_unit_transitively():
    units = conftest.work_units({"a.py": {"exported"}, "b.py": {"exported", "captured"}, "c.py": {"captured"},
                                 "d.py": {"small_export"}, "e.py": set()})
    assert units["a.py"] == units["b.py"] == units["c.py"] != units["d.py"]
    assert units["d.py"] == "shares-small_export" and units["e.py"] == "e.py"


def test_every_file_that_uses_a_shared_export_shows_it_in_its_source():
    """The tree as it is: the files that share each export, as the scheduler reads them (a test that
    takes one through a fixture the reading cannot see stops collection: pytest_collection_modifyitems)."""
    tests = conftest.TESTS
    shared = {p.relative_to(tests).as_posix(): conftest.shared_in_source(p) for p in tests.rglob("test_*.py")}
    users = {name: sorted(f for f, used in shared.items() if name in used) for name in conftest.SHARED_EXPORTS}
    assert "lowering/test_lower.py" in users["exported"] and "e2e/test_reliability.py" in users["small_export"]
    assert "passes/test_absorb_mla.py" in users["captured"] and "e2e/test_cli.py" not in users["exported"]  # its own
