"""The default console shows the script's own lines only; `--verbose` lets third-party warnings through."""

import pytest

pytestmark = pytest.mark.slow  # every test here starts a script (the toy runs of tests/conftest.py)

# lines third-party code writes: Python warnings, logging records, torch's C++ warnings ("[W1130 ...] Warning: ...")
THIRD_PARTY = ("Warning", "WARNING", "INFO", "[W", "NUMA")


def test_default_console_has_no_third_party_lines_and_verbose_shows_them(custom_task_run,
                                                                           difficulty_task_verbose_run):
    """Two toy refuel.py runs (each shared with test_refuel_tasks.py): the default console, and one with --verbose."""
    _, quiet = custom_task_run
    assert "memory plan per rank" in quiet and "score by turn" in quiet
    assert [line for line in quiet.splitlines() if any(marker in line for marker in THIRD_PARTY)] == []
    # a run with --verbose lets them through (which ones depends on the machine: vLLM's "NUMA binding" line comes
    # from torch's C++ log on some CPUs only, Python's warnings on every one)
    _, verbose, _ = difficulty_task_verbose_run
    assert "memory plan per rank" in verbose
    assert [line for line in verbose.splitlines() if any(marker in line for marker in THIRD_PARTY)] != []
