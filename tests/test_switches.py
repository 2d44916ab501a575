"""The experimental switches read from the environment: a value that cannot be used keeps the default, named."""

from __future__ import annotations

import pytest

from offload import switches
from offload.errors import OffloadWarning


@pytest.mark.parametrize("raw, least, want", [("", 0, 5), ("3", 0, 3), (" 0 ", 0, 0), ("0", 1, None), ("-1", 0, None),
                                              ("1.5", 0, None), ("abc", 0, None)])
def test_an_integer_switch(monkeypatch, raw, least, want):
    monkeypatch.setenv("OFFLOAD_TEST_SWITCH", raw)
    if want is not None:
        assert switches.integer("OFFLOAD_TEST_SWITCH", 5, least) == want
        return
    with pytest.warns(OffloadWarning, match=f"OFFLOAD_TEST_SWITCH={raw!r} is not a whole number of at least "
                                            f"{least}; using 5"):
        assert switches.integer("OFFLOAD_TEST_SWITCH", 5, least) == 5
