"""Receiving one file's bytes into its partial file, hashed on the way, in three threads: this one reads the
connection and gathers what arrives into 1 MiB buffers, a second hashes each buffer, a third appends it to the
file. hashlib and os.write release the GIL, so the three run at once on different buffers: checking every byte
costs neither a second read of the file nor the receiving thread's time.

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

from vlhub.errors import VlhubError

BUFFER_BYTES = 1 << 20  # what the other two threads take at a time (measured here: faster than 2 and 4 MiB)
BUFFERS = 8  # per transfer: at most 8 MiB received and not yet on disk
# a cancelled transfer stops at the next multiple of this: a smaller file is read to its end, so its connection
# closes cleanly instead of being reset with unread bytes (http_get checked at its 10 MiB writes)
CANCEL_EVERY = 16 << 20


class Cancelled(Exception):
    """Raised in a transfer once another transfer failed or the user interrupted."""


class ShortBody(Exception):
    """The connection ended before the file did (retried like a dropped connection)."""


class LongBody(VlhubError):
    """The server sent more bytes than the hub lists for the file: not retried, the listing and the file disagree."""


def receive(url: str, fd: int, have: int, size: int, new_digest: Callable[[], Any], digest: Any,
            on_bytes: Callable[[int], None] | None, cancel: threading.Event, token: str | None = None) -> Any:
    """Fetch bytes `have`.. of the `size`-byte file at `url` and append them to `fd`, which holds the first `have`
    bytes, already fed to `digest`. A server that ignores the Range header sends the whole file: the file and the
    hash then start again (`new_digest`). `token` (else the client's: HF_TOKEN, `hf auth login`) authorises a gated
    repo. Returns the digest of the whole file."""
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    if have == size:  # all there (killed before the rename): a Range past the end would be refused
        return digest
    headers = build_hf_headers(token=token)
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
    if have > size:
        raise LongBody(f"{url} sent {have} bytes where the hub lists {size}: the repo changed while downloading or "
                       "the server is not serving the file listed; run the command again later, or use another mirror")
    if have < size:
        raise ShortBody(f"the connection ended after {have} of the file's {size} bytes")
    return digest


def append_hashed(chunks: Iterable[bytes], fd: int, digest: Any, on_bytes: Callable[[int], None] | None,
                  cancel: threading.Event) -> int:
    """Append `chunks` to `fd` (from its offset) and feed them to `digest`, in order, through three threads: this
    one copies them into BUFFERS buffers of BUFFER_BYTES, a second hashes each full buffer and hands it to a third,
    which appends it to the file. The three stages work on different buffers at once, so a transfer goes at the
    pace of its slowest stage, not of their sum. What arrived before an error (a dropped connection, `cancel` set)
    is written before the error is raised, so a resume continues after it; an error of the writing thread (a full
    disk) is raised instead. Returns the bytes appended."""
    free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
    to_hash: queue.SimpleQueue[tuple[bytearray, int] | None] = queue.SimpleQueue()
    to_write: queue.SimpleQueue[tuple[bytearray, int] | None] = queue.SimpleQueue()
    for _ in range(BUFFERS):
        free.put(bytearray(BUFFER_BYTES))
    failed: list[BaseException] = []

    def hash_each() -> None:
        while (item := to_hash.get()) is not None:
            buffer, filled = item
            if failed:  # after a failure, only hand the buffers back until the end
                free.put(buffer)
                continue
            try:
                digest.update(memoryview(buffer)[:filled])
            except BaseException as exc:  # noqa: BLE001 - raised by the receiving thread
                failed.append(exc)
                free.put(buffer)
                continue
            to_write.put(item)
        to_write.put(None)

    def write_each() -> None:
        while (item := to_write.get()) is not None:
            buffer, filled = item
            if not failed:  # after a failure, only hand the buffers back until the end
                try:
                    view = memoryview(buffer)[:filled]
                    while view:
                        view = view[os.write(fd, view):]
                    if on_bytes:
                        on_bytes(filled)
                except BaseException as exc:  # noqa: BLE001 - raised by the receiving thread
                    failed.append(exc)
            free.put(buffer)

    # daemons, as the transfer threads are: Ctrl-C ends the process at once, the partial file keeps what was written
    stages = [threading.Thread(target=work, name=f"download-{work.__name__}", daemon=True)
              for work in (hash_each, write_each)]
    for stage in stages:
        stage.start()
    appended, buffer, filled = 0, free.get(), 0
    try:
        for chunk in chunks:
            piece = memoryview(chunk)
            while piece:
                step = min(len(piece), BUFFER_BYTES - filled)
                buffer[filled:filled + step] = piece[:step]
                filled += step
                piece = piece[step:]
                if filled == BUFFER_BYTES:
                    if failed:
                        break
                    to_hash.put((buffer, filled))
                    appended, filled = appended + filled, 0
                    if appended % CANCEL_EVERY == 0 and cancel.is_set():
                        raise Cancelled
                    buffer = free.get()
            if failed:
                break
    finally:
        if filled:
            to_hash.put((buffer, filled))
            appended += filled
        to_hash.put(None)
        for stage in stages:
            stage.join()
        if failed:
            raise failed[0]
    return appended
