"""One model's queue of acquire() calls in one process: FIFO, with the look-ahead hand-over.

The first call is the head: it alone takes slots from the schedule (local or Redis), passing the
costs of the calls behind it and how many slots it has handed over. When the schedule gives the
slot to one of those (a smaller request that fits before the head's slot without moving it, or
one that packs the window better, `Reply.waiter`), the head hands the reply over and that call
leaves the queue; the head asks again. No algorithm here: which waiter goes is the schedule's
decision, in both backends alike.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from itertools import islice

from batcher.admission.schedule import Reply


@dataclass(eq=False, slots=True)
class Waiter:
    cost: int
    # None: it is the head now; a Reply: the slot the head handed to it. A call that found
    # the line empty is the head at once and has no future (most calls below the limits).
    turn: asyncio.Future[Reply | None] | None


class Lane:
    """The FIFO of one model's acquire() calls; `enter` waits for a turn or a handed slot."""

    def __init__(self) -> None:
        self._queue: deque[Waiter] = deque()

    def empty(self) -> bool:
        return not self._queue

    def take(self, cost: int) -> bool:
        """The head at once if the line is empty (True: the caller must `leave()` when done),
        without a future or an await; False: wait in line with `enter`."""
        if self._queue:
            return False
        self._queue.append(Waiter(cost, None))
        return True

    async def enter(self, cost: int, *, front: bool = False) -> Reply | None:
        """Wait in line: None when this call is the head (it must call `leave()` when done),
        or the reply of a slot the head handed to it. `front`: right behind the head (a
        handed slot a pause voided goes back where it was, not to the end)."""
        if self.take(cost):
            return None
        turn: asyncio.Future[Reply | None] = asyncio.get_running_loop().create_future()
        waiter = Waiter(cost, turn)
        if front:
            self._queue.insert(1, waiter)
        else:
            self._queue.append(waiter)
        try:
            return await turn
        except asyncio.CancelledError:
            if waiter in self._queue:
                head = self._queue[0] is waiter
                self._queue.remove(waiter)
                if head:
                    self._next()
            raise

    def behind(self, count: int) -> list[Waiter]:
        """Up to `count` calls waiting behind the head, in order."""
        if count <= 0 or len(self._queue) < 2:
            return []
        line = islice(self._queue, 1, count + 1)
        return [w for w in line if w.turn is not None and not w.turn.done()]

    def hand(self, waiter: Waiter, reply: Reply) -> None:
        """Give `reply`'s slot to `waiter` (from `behind`); a call cancelled meanwhile loses it
        (the slot stays taken, as a cancelled head's does)."""
        if waiter in self._queue:
            self._queue.remove(waiter)
        if waiter.turn is not None and not waiter.turn.done():
            waiter.turn.set_result(reply)

    def leave(self) -> None:
        """The head is done: the next call in line becomes the head."""
        if self._queue:
            self._queue.popleft()
        self._next()

    def _next(self) -> None:
        while self._queue:
            turn = self._queue[0].turn
            if turn is None or turn.done():  # cancelled, not yet removed
                self._queue.popleft()
                continue
            turn.set_result(None)
            return
