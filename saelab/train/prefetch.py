"""Batches read ahead on a background thread, so that the step never waits for the data.

The source's iterator runs on one thread: a store's reads (memory-mapped shards, `index_select`)
and the dtype conversion release the GIL, so they overlap the step. Bound for a GPU, each batch is
pinned there, and the trainer's copy to the device then returns at once (a pinned host → device copy
is asynchronous): reading, copying and computing overlap. The order is the iterator's, so training
stays a deterministic function of the seed; the queue holds at most `depth` batches.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")
_POLL_S = 0.1  # how often a blocked thread checks whether it was asked to stop


class _End:
    """The iterator is exhausted."""


class _Failed:
    """The iterator raised `error`; the consumer raises it in its own thread."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class Prefetcher(Generic[T]):
    """Iterate `items` on a thread, `prepare` each there, and hand them over in order; a context manager
    whose exit stops the thread (also when the consumer stops early or fails)."""

    def __init__(self, items: Iterator[Any], prepare: Callable[[Any], T], depth: int = 2) -> None:
        self._items, self._prepare = items, prepare
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="saelab-prefetch", daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        item = self._queue.get()
        if isinstance(item, _End):
            self._queue.put(item)  # stays exhausted
            raise StopIteration
        if isinstance(item, _Failed):
            raise item.error
        return item

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the thread; it finishes at most the item it is preparing."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get_nowait()  # room for a put the thread may be blocked in
            except queue.Empty:
                pass
            self._thread.join(timeout=_POLL_S)

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                item = next(self._items, _End)
                if item is _End:
                    self._put(_End())
                    return
                self._put(self._prepare(item))
        except BaseException as error:  # noqa: BLE001 — handed to the consumer, which raises it
            self._put(_Failed(error))

    def _put(self, item: object) -> None:
        """Queue `item`, waiting for room; give up if asked to stop meanwhile (`_fill` then checks the stop)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue
