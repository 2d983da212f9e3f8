"""Figures a test module measures (step timings, gaps), printed together at its end.

Theory of operation: a module's ``figures`` fixture (module scope) yields from
:func:`printed_at_end`; tests ``add`` lines to the :class:`Figures` it gives, which are printed
at once (seen with ``-s``) and again, all together under the module's title, when the module
is done -- outside pytest's capture, so a plain ``make test`` shows them. Figures are reported,
never asserted (speed is measured in bench/, not tested).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


class Figures:
    """Measured numbers, printed together at the end of the module."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        self.lines.append(line)
        print(line)

    def ms(self, what: str, seconds: float) -> None:
        self.add(f"{what}: {seconds * 1000:.0f} ms")


def printed_at_end(request: pytest.FixtureRequest, title: str) -> Iterator[Figures]:
    """The body of a module-scoped ``figures`` fixture: ``yield from printed_at_end(...)``."""
    f = Figures()
    yield f
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not f.lines:
        return
    with capture.global_and_fixture_disabled():  # teardown output is captured otherwise
        reporter.write_line("")
        reporter.write_sep("-", title)
        for line in f.lines:
            reporter.write_line(line)
