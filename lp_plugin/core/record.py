"""The install record: each change ``attach`` makes to a model, recorded with the step that undoes it;
``detach`` replays the undo steps in reverse, so whatever was installed is undone, also after an attach
that failed half way."""

from __future__ import annotations

from collections.abc import Callable


class InstallRecord:
    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], object]]] = []

    def did(self, what: str, undo: Callable[[], object]) -> None:
        """Record a change and how to undo it. Recorded before the change is made where ``undo`` copes
        with a change made in part (a failure half way is undone too), after it otherwise."""
        self._steps.append((what, undo))

    @property
    def steps(self) -> list[str]:
        """What is installed now, in the order it was done."""
        return [what for what, _ in self._steps]

    def undo(self) -> None:
        """Undo every recorded change, the last first. A step that raises stops the replay and stays
        recorded (with those before it), so calling again resumes there."""
        while self._steps:
            _, undo = self._steps[-1]
            undo()
            self._steps.pop()
