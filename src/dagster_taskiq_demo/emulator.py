"""moto's AWS emulator as a child process on 127.0.0.1 (DESIGN.md: moto instead of LocalStack)."""

import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass

from dagster_taskiq_demo.stack import stop_process, wait_for

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
# The emulator accepts any credentials; boto still wants some.
EMULATOR_CREDENTIALS = {'AWS_ACCESS_KEY_ID': 'testing', 'AWS_SECRET_ACCESS_KEY': 'testing'}


class EmulatorError(RuntimeError):
    """The emulator did not come up."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return int(sock.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f'{url}/moto-api/', timeout=1):
            return True
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class MotoServer:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f'http://127.0.0.1:{self.port}'

    def stop(self) -> None:
        """Stop the server and wait for it to exit (killed if it does not within the timeout)."""
        stop_process(self.process, STOP_TIMEOUT_S)


def start_moto(port: int | None = None) -> MotoServer:
    """Start moto's server on 127.0.0.1 and wait until it answers."""
    port = port or free_port()
    process = subprocess.Popen(
        [sys.executable, '-m', 'moto.server', '-H', '127.0.0.1', '-p', str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **EMULATOR_CREDENTIALS},
    )
    server = MotoServer(port=port, process=process)

    def answers() -> bool:
        if process.poll() is not None:
            raise EmulatorError(f'moto server exited with code {process.returncode}')
        return _answers(server.url)

    try:
        wait_for(answers, START_TIMEOUT_S, f'moto server answering on port {port}')
    except (EmulatorError, TimeoutError) as error:
        server.stop()
        raise EmulatorError(f'moto server did not start on port {port}: {error}') from error
    return server
