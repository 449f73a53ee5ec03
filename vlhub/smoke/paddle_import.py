"""Paddle, imported so that Ctrl-C and SIGTERM still reach vlhub.

`import paddle` installs its own C-level handlers for SIGINT and SIGTERM over Python's (measured here with
paddlepaddle 3.3.1: a Ctrl-C after the import either kills the process outright, skipping vlhub's clean-up, or is
lost and the command runs on). Every vlhub module that uses paddle imports it from here, which puts Python's
handlers back once paddle is loaded.
"""

from __future__ import annotations

import signal
import threading

_HELD = (signal.SIGINT, signal.SIGTERM)
_before = {signum: signal.getsignal(signum) for signum in _HELD}

import paddle  # after noting the handlers it replaces
import paddle.nn.functional as F

if threading.current_thread() is threading.main_thread():  # handlers can only be set from the main thread
    for _signum, _handler in _before.items():
        if _handler is not None:  # None: set outside Python, nothing of ours to put back
            signal.signal(_signum, _handler)

__all__ = ["F", "paddle"]
