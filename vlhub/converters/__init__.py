"""Streaming checkpoint I/O: readers, writers and (later) the ops and plans that convert between them."""
