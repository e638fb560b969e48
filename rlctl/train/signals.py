"""Ctrl-C and SIGTERM: the first stops the run after the current step with a checkpoint, the second now."""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable


class StopRequest:
    def __init__(self, say: Callable[[str], None]):
        self.say = say
        self.requested = False

    def install(self) -> Callable[[], None]:
        """Install the handlers; returns the function that restores the previous ones."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def handler(signum: int, frame: Any) -> None:
            if self.requested:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            self.requested = True
            self.say("stopping after this step and writing a checkpoint (Ctrl-C again to quit now)")

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

        def restore() -> None:
            for sig, old in previous.items():
                signal.signal(sig, old)

        return restore
