"""The fault-injecting proxy itself: it forwards, swallows with connections open, or resets."""

import socket
import socketserver
import threading
from collections.abc import Iterator

import pytest

from dagster_taskiq_demo.faultproxy import FaultProxy, Mode

ANSWER_WAIT_S = 1.0  # how long `drop` is watched for an answer that must not come


class Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(1024):
            self.request.sendall(data)


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    server = socketserver.ThreadingTCPServer(('127.0.0.1', 0), Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with FaultProxy('127.0.0.1', server.server_address[1]) as proxy:
            yield proxy
    finally:
        server.shutdown()
        server.server_close()


def connect(proxy: FaultProxy) -> socket.socket:
    return socket.create_connection(('127.0.0.1', proxy.port), timeout=ANSWER_WAIT_S)


def test_pass_forwards_both_ways(proxy: FaultProxy) -> None:
    with connect(proxy) as client:
        client.sendall(b'ping')
        assert client.recv(1024) == b'ping'


def test_drop_swallows_and_keeps_the_connection_open(proxy: FaultProxy) -> None:
    with connect(proxy) as client:
        client.sendall(b'before')
        assert client.recv(1024) == b'before'
        proxy.set_mode(Mode.DROP)
        client.sendall(b'during')
        with pytest.raises(TimeoutError):  # no answer, and no close either
            client.recv(1024)
        proxy.set_mode(Mode.PASS)
        client.sendall(b'after')
        assert client.recv(1024) == b'after'  # the same connection carries on


def closed_by_peer(client: socket.socket) -> bool:
    try:
        client.sendall(b'x')
        return client.recv(1024) == b''
    except ConnectionResetError:
        return True


def test_reset_closes_open_connections_and_refuses_new_ones(proxy: FaultProxy) -> None:
    with connect(proxy) as client:
        client.sendall(b'ping')
        assert client.recv(1024) == b'ping'
        proxy.set_mode(Mode.RESET)
        assert closed_by_peer(client)
    with connect(proxy) as again:
        assert closed_by_peer(again)
