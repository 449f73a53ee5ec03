"""Receiving one file's bytes into its partial file, hashed on the way: this thread reads the connection and gathers
what arrives into large buffers while another thread hashes each buffer and appends it to the file. hashlib and
os.write release the GIL, so checking every byte costs neither a second read of the file nor the receiving
thread's time: receiving, hashing and writing run at once.

The request goes through huggingface_hub's own HTTP client (`get_session()`), so HF_ENDPOINT, HF_TOKEN, proxies,
certificates, redirects (the token stays on the hub's host) and timeouts are the client's; only the body loop is
ours, because `http_get` re-joins the connection's 64 KiB pieces into 10 MiB chunks (copies of every byte into
fresh allocations) and would leave the hash to the thread that receives.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any

BUFFER_BYTES = 4 << 20  # what the hashing thread takes at a time: one os.write and one GIL release per 4 MiB
BUFFERS = 4  # per transfer: at most 16 MiB received and not yet on disk


class Cancelled(Exception):
    """Raised in a transfer once another transfer failed or the user interrupted."""


class ShortBody(Exception):
    """The connection ended before the file did (retried like a dropped connection)."""


def receive(url: str, fd: int, have: int, size: int, new_digest: Callable[[], Any], digest: Any,
            on_bytes: Callable[[int], None] | None, cancel: threading.Event) -> Any:
    """Fetch bytes `have`.. of the `size`-byte file at `url` and append them to `fd`, which holds the first `have`
    bytes, already fed to `digest`. A server that ignores the Range header sends the whole file: the file and the
    hash then start again (`new_digest`). Returns the digest of the whole file."""
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    if have == size:  # all there (killed before the rename): a Range past the end would be refused
        return digest
    headers = build_hf_headers()
    if have:
        headers["Range"] = f"bytes={have}-"
    with get_session().stream("GET", url, headers=headers, follow_redirects=True,
                              timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
        hf_raise_for_status(response)
        if have and response.status_code != 206:
            os.ftruncate(fd, 0)
            have, digest = 0, new_digest()
        os.lseek(fd, have, os.SEEK_SET)
        # decoded: the hub may gzip a text file; chunk_size None hands on each piece as it arrives, uncopied
        have += append_hashed(response.iter_bytes(), fd, digest, on_bytes, cancel)
    if have != size:
        raise ShortBody(f"the connection ended after {have} of the file's {size} bytes")
    return digest


def append_hashed(chunks: Iterable[bytes], fd: int, digest: Any, on_bytes: Callable[[int], None] | None,
                  cancel: threading.Event) -> int:
    """Append `chunks` to `fd` (from its offset) and feed them to `digest`, in order: this thread copies them into
    BUFFERS buffers of BUFFER_BYTES, another hashes and writes each full one. What arrived before an error (a dropped
    connection, `cancel` set) is written before the error is raised, so a resume continues after it; an error of the
    writing thread (a full disk) is raised instead. Returns the bytes appended."""
    free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
    full: queue.SimpleQueue[tuple[bytearray, int] | None] = queue.SimpleQueue()
    for _ in range(BUFFERS):
        free.put(bytearray(BUFFER_BYTES))
    failed: list[BaseException] = []

    def hash_and_write() -> None:
        while (item := full.get()) is not None:
            buffer, filled = item
            if not failed:  # after a failure, only hand the buffers back until the end
                try:
                    view = memoryview(buffer)[:filled]
                    digest.update(view)
                    while view:
                        view = view[os.write(fd, view):]
                    if on_bytes:
                        on_bytes(filled)
                except BaseException as exc:  # noqa: BLE001 - raised by the receiving thread
                    failed.append(exc)
            free.put(buffer)

    # a daemon, as the transfer threads are: Ctrl-C ends the process at once, the partial file keeps what was written
    writer = threading.Thread(target=hash_and_write, name="hash-and-write", daemon=True)
    writer.start()
    appended, buffer, filled = 0, free.get(), 0
    try:
        for chunk in chunks:
            if cancel.is_set():
                raise Cancelled
            if failed:
                break
            piece = memoryview(chunk)
            while piece:
                step = min(len(piece), BUFFER_BYTES - filled)
                buffer[filled:filled + step] = piece[:step]
                filled += step
                piece = piece[step:]
                if filled == BUFFER_BYTES:
                    full.put((buffer, filled))
                    appended += filled
                    buffer, filled = free.get(), 0
    finally:
        if filled:
            full.put((buffer, filled))
            appended += filled
        full.put(None)
        writer.join()
        if failed:
            raise failed[0]
    return appended
