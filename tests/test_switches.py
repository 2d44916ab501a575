"""The experimental switches read from the environment: a value that cannot be used keeps the default, named."""

from __future__ import annotations

import pytest

from offload import switches
from offload.errors import OffloadWarning


@pytest.mark.parametrize("raw, least, want", [("", 0, 5), ("3", 0, 3), (" 0 ", 0, 0), ("0", 1, None), ("-1", 0, None),
                                              ("1.5", 0, None), ("abc", 0, None), ("\uff14", 0, None)])
def test_an_integer_switch(monkeypatch, raw, least, want):
    monkeypatch.setenv("OFFLOAD_TEST_SWITCH", raw)
    if want is not None:
        assert switches.integer("OFFLOAD_TEST_SWITCH", 5, least) == want
        return
    with pytest.warns(OffloadWarning, match=f"OFFLOAD_TEST_SWITCH={raw!r} is not a whole number of at least "
                                            f"{least}; using 5"):
        assert switches.integer("OFFLOAD_TEST_SWITCH", 5, least) == 5


@pytest.mark.parametrize("raw, want", [("", "default"), ("0", False), (" 1 ", True), ("2", None), ("false", None),
                                       ("yes", None)])
def test_a_choice_switch(monkeypatch, raw, want):
    """An on/off switch given anything but 0 or 1 keeps its default, named (OFFLOAD_WHOLE_PASS=false left whole
    passes on with no word)."""
    monkeypatch.setenv("OFFLOAD_TEST_SWITCH", raw)
    if want is not None:
        assert switches.choice("OFFLOAD_TEST_SWITCH", switches.ON_OFF, "default") == want
        return
    with pytest.warns(OffloadWarning, match=f"OFFLOAD_TEST_SWITCH={raw.strip()!r} is not one of 0, 1; using the "
                                            "default"):
        assert switches.choice("OFFLOAD_TEST_SWITCH", switches.ON_OFF, "default") == "default"


def test_every_on_off_switch_goes_through_choice():
    """No module reads an OFFLOAD_* switch but through ``switches`` (the cache directory aside)."""
    import re
    from pathlib import Path

    package = Path(switches.__file__).parent
    readers = {p.relative_to(package).as_posix() for p in package.rglob("*.py")
               if re.search(r'environ(\.get)?[\[(]"OFFLOAD_(?!CACHE_DIR)', p.read_text())}
    assert readers == set()
