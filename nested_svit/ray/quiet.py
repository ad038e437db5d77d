"""Ray's own noise on the driver's stderr, filtered: the core worker logs an error-level line for every
Ray Data actor pool ("Actor with class name ... has constructor arguments in the object store and
max_restarts > 0", ray-project/ray#57733): Ray Data passes its own internal objects to its map workers,
so it appears with any actor, ours take no such arguments, and the restarts it warns about are tested
(a killed actor is retried, tests/test_ray_engine.py). A user reads it as a failure, so it is dropped;
everything else on stderr passes through unchanged."""
from __future__ import annotations

import contextlib
import os
import re
import sys
import threading

NOISE = re.compile(rb"\[[^\]\n]*\] core_worker\.cc:\d+: Actor with class name: [^\n]*has constructor arguments in "
                   rb"the object store[^\n]*\n?")


@contextlib.contextmanager
def without_actor_argument_noise():
    """Within: file descriptor 2 goes through a pipe whose reader forwards all but ``NOISE``."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (an embedding host): nothing to filter
        yield
        return
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        while True:
            data = os.read(read_end, 1 << 16)
            if not data:
                return
            os.write(saved, NOISE.sub(b"", data))

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last write end closes (unless a child process still holds it)
        thread.join(timeout=5)
        if not thread.is_alive():
            os.close(read_end)
            os.close(saved)
