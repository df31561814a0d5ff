"""A fault-injecting TCP proxy: put it between a worker and PostgreSQL or SQS, then cut the link.

Modes: `pass` forwards bytes both ways; `drop` swallows them and keeps every connection open (a
partition that drops packets: nothing answers, nothing fails); `reset` closes every connection and
refuses new ones (a peer that is gone). The proxy runs its own event loop on a thread, so the same
object serves a sync test, an async test and worker subprocesses alike. (toxiproxy is not in our
registries.)
"""

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from enum import StrEnum
from types import TracebackType
from typing import Any, TypeVar

from dagster_taskiq.logs import get_logger

T = TypeVar('T')
log = get_logger(__name__)

CHUNK_BYTES = 65536
START_TIMEOUT_S = 10.0


class Mode(StrEnum):
    PASS = 'pass'
    DROP = 'drop'
    RESET = 'reset'


class FaultProxy:
    """Listens on 127.0.0.1:`port` (a free one by default) and forwards to `target`."""

    def __init__(self, target_host: str, target_port: int, port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.requested_port = port
        self.port = 0
        self.mode = Mode.PASS
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name='fault-proxy', daemon=True
        )
        self.server: asyncio.Server | None = None
        self.connections: set[asyncio.StreamWriter] = set()

    def __enter__(self) -> 'FaultProxy':
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        self.thread.start()
        self.server = self._call(
            asyncio.start_server(self._serve, '127.0.0.1', self.requested_port)
        )
        self.port = self.server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        if self.server is not None:
            self._call(self._close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()

    def set_mode(self, mode: Mode) -> None:
        """Switch mode (done when this returns); `reset` also closes every open connection."""
        self._call(self._switch(mode))
        log.info('fault_proxy_mode', mode=str(mode), port=self.port, target=self.target)

    async def _switch(self, mode: Mode) -> None:
        self.mode = mode
        if mode is Mode.RESET:
            self._abort_all()

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(START_TIMEOUT_S)

    async def _close(self) -> None:
        assert self.server is not None
        self.server.close()
        self._abort_all()
        await self.server.wait_closed()

    def _abort_all(self) -> None:
        for writer in list(self.connections):
            writer.transport.abort()
        self.connections.clear()

    def _refusing(self) -> bool:
        return self.mode is Mode.RESET

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing():
            writer.transport.abort()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.connections |= {writer, upstream_writer}
        if self._refusing():  # switched while this connection was being made
            self._abort_all()
            return
        try:
            await asyncio.gather(
                self._pump(reader, upstream_writer), self._pump(upstream_reader, writer)
            )
        finally:
            for end in (writer, upstream_writer):
                self.connections.discard(end)
                end.transport.abort()

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await source.read(CHUNK_BYTES):
                if self.mode is Mode.PASS:
                    sink.write(data)
                    await sink.drain()
                # DROP: swallowed, the connection stays open; RESET aborts it from outside
        sink.transport.abort()  # one side ended: so does the other
