"""The session gate: what the hooks and the model entry see of an attached model. It opens the movers
(``mover.py``) when the outermost session opens and releases them when it closes; re-entrant and
thread-safe; a bare forward is a session of its own, and forwards through buffers a forward reuses run
one at a time.

A compiled forward reads :attr:`SessionGate.in_session`, so dynamo guards on it: it is a bool set when
the outermost session opens and cleared when it closes, the same in a nested and in a per-call session.
Nothing a hook reads counts sessions (the depth and the epoch are read only outside a compiled forward,
or to check a backward).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import types

import torch

from ..errors import AttachError
from .mover import Mover


def copy_error() -> AttachError:
    """What copying an attached model raises: ``copy.deepcopy``, ``pickle`` and ``torch.save(model)`` alike."""
    return AttachError(
        "copy.deepcopy, pickle and torch.save(model) of a model with lp_plugin attached are not supported: the "
        "offloaded layers' weights live in lp_plugin's tier. Save the weights (model.save_pretrained(...) or "
        "torch.save(model.state_dict(), ...) give the real ones), or copy the plain model "
        "(lp_plugin.get_handle(model).detach() first) and attach each copy"
    )


def refuse_copy(protocol=None):
    """An attached model's ``__reduce_ex__`` (set on the instance, where ``pickle`` and ``copy`` look first)."""
    raise copy_error()


class SessionGate:
    def __init__(self, movers: list[Mover], stats: dict):
        self.movers = movers  # one per device the units compute on, filled in by attach
        self.stats = stats  # "forwards" counted here; the movers count their sessions
        self.peak_mapped_bytes = 0  # the most device memory the movers held at once
        self.attached = True  # False once detached: no session opens again
        self.lock = threading.RLock()
        self._depth = 0
        self._in_session = False
        self._epoch = 0  # sessions opened so far: what a backward checks it still runs in
        self._forwards = threading.local()  # per thread: bare forwards whose session is open (``stack``)
        self.on_close: list = []  # called as the outermost session closes, before the movers release

    def __deepcopy__(self, memo):
        raise copy_error()

    @property
    def in_session(self) -> bool:
        """A session is open (session mode: the offloaded layers are on the device). A bool, set when the
        outermost session opens and cleared when it closes: a compiled forward that reads it guards on a
        value that does not change between nested and per-call sessions (the depth does)."""
        return self._in_session

    @property
    def depth(self) -> int:
        """Sessions open now, nested or in other threads (0: standby)."""
        return self._depth

    @property
    def mapped_bytes(self) -> int:
        return sum(m.mapped_bytes for m in self.movers)

    def _reuses_buffers(self) -> bool:
        return any(m.reuses_buffers for m in self.movers)

    # ------------------------------------------------------------------ sessions
    @contextlib.contextmanager
    def session(self):
        self.close_interrupted()
        self.open()
        try:
            yield
        finally:
            self.close()

    def open(self) -> None:
        if not self.attached:
            raise AttachError("this OffloadHandle was detached; call lp_plugin.attach(model, ...) again to offload")
        with self.lock:
            if self._depth == 0:
                opened = []
                try:
                    for mover in self.movers:
                        mover.open()
                        opened.append(mover)
                except BaseException:
                    for mover in opened:
                        mover.release()
                    raise
                self._epoch += 1
                self.peak_mapped_bytes = max(self.peak_mapped_bytes, self.mapped_bytes)
                self._in_session = True
            self._depth += 1

    def close(self) -> None:
        with self.lock:
            self._depth -= 1
            if self._depth == 0:
                self._in_session = False
                for callback in list(self.on_close):
                    callback()
                refused = []
                for mover in self.movers:
                    try:
                        mover.release()
                    except AttachError as exc:  # every mover is released before an edit is refused
                        refused.append(exc)
                if self.movers and torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if refused:
                    raise refused[0]

    # ------------------------------------------------------------------ what the model entry calls
    def enter_forward(self, frame=None) -> None:
        """A bare forward of the model (run by ``frame``, the module call that runs the hooks): a session of its
        own; one forward at a time through reused buffers."""
        self.close_interrupted()
        forwards = self._thread_forwards()
        serial = self._reuses_buffers()
        if serial:
            self.lock.acquire()
        forwards.append(frame)  # (before the session opens: closed with it; held, so its id stays its own)
        try:
            self.open()
        except BaseException:
            forwards.pop()
            if serial:
                self.lock.release()
            raise
        self.stats["forwards"] += 1

    def exit_forward(self) -> None:
        """After a bare forward (also when it, or :meth:`enter_forward`, raised)."""
        forwards = self._thread_forwards()
        if not forwards:
            return  # enter_forward failed: nothing to close
        forwards.pop()
        try:
            self.close()
        finally:
            if self._reuses_buffers():
                self.lock.release()

    def _thread_forwards(self) -> list:
        """This thread's open bare forwards, innermost last: the frame running each (None: not known)."""
        stack = getattr(self._forwards, "stack", None)
        if stack is None:
            stack = self._forwards.stack = []
        return stack

    def close_interrupted(self) -> int:
        """Close the bare forwards this thread left open when interrupted (KeyboardInterrupt, SystemExit: PyTorch
        calls an always-called forward hook on an ``Exception`` only), as that hook would have: the end of the
        forward, then its session. A forward whose frame is still on this thread's stack is running (a session
        opened from inside it): it stays. Called before the thread's next forward, session or ``detach``, and
        as an interrupt leaves ``generate``. Returns how many were closed."""
        forwards = getattr(self._forwards, "stack", None)
        if not forwards:
            return 0
        running: set[int] = set()
        frame: types.FrameType | None = sys._getframe(1)
        while frame is not None:
            running.add(id(frame))
            frame = frame.f_back
        closed = 0
        while forwards and id(forwards[-1]) not in running:
            with contextlib.suppress(Exception):  # (what the interrupted forward left half done)
                self.end_forward(None)
            closed += 1
            self.exit_forward()
        return closed

    def end_forward(self, output) -> None:
        """After every forward of the model, compiled or not: each mover's end of a forward."""
        for mover in self.movers:
            mover.end_forward(output)

    # ------------------------------------------------------------------ what a backward checks
    def grad_token(self):
        """What a backward through an offloaded layer checks: the session the forward ran in (None where
        the buffers are reused at once, stream mode)."""
        return self._epoch if not self._reuses_buffers() and self._depth > 0 else None

    def grad_token_valid(self, token) -> bool:
        return self._depth > 0 and self._epoch == token
