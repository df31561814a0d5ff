"""The local ECS agent: does on this machine what ECS does in AWS for the worker service.

Each poll it reads the service's desiredCount from the emulator and reconciles it into real
`dagster-taskiq worker` processes: starts missing ones, replaces any that exit unexpectedly, and
stops surplus ones with SIGTERM (they drain first). A process is registered as a task (RunTask,
startedBy `ecs-svc/<service>`) once it serves, and deregistered (StopTask) when it exits, so
list-tasks shows the workers really serving: moto's own describe-services reports runningCount
equal to desiredCount whatever runs.

With `links` (`ecs-agent --fault-proxies`), each worker reaches SQS and its store through fault
proxies of its own, and the agent cuts or restores them as `<data dir>/partitions.json` says (the
network-partition scenario writes it): `{worker_id: {"sqs": "drop", "store": "reset"}}`; a link
not named passes. Lifting a `drop` resets the link first (its open connections carry swallowed
bytes), as a network that comes back after a partition would.
"""

import json
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from botocore.exceptions import BotoCoreError, ClientError

from dagster_taskiq.logs import get_logger
from dagster_taskiq_demo.faultproxy import FaultProxy, Mode
from dagster_taskiq_demo.stack import WorkerProcess, spawn_worker

log = get_logger(__name__)

TASK_FAMILY = 'taskiq-worker'
PARTITIONS_FILE = 'partitions.json'
DEFAULT_PORTS = {'http': 80, 'https': 443, 'postgresql': 5432, 'postgres': 5432}
PARTITION_POLL_S = 0.2  # how soon a cut the file asks for takes effect
# The worker's setting each link replaces with its proxy's address.
LINK_VARIABLES = {'sqs': 'DAGSTER_TASKIQ_AWS_ENDPOINT_URL', 'store': 'DAGSTER_TASKIQ_DATABASE_URL'}


def started_by(service: str) -> str:
    return f'ecs-svc/{service}'[:36]  # ECS's limit on startedBy


def bootstrap_ecs(ecs: Any, cluster: str, service: str) -> str:
    """Create the cluster, the worker task definition and service (desiredCount 0) unless they
    exist; returns the task definition's ARN. Safe to repeat."""
    ecs.create_cluster(clusterName=cluster)
    try:
        task_definition = ecs.describe_task_definition(taskDefinition=TASK_FAMILY)
    except ecs.exceptions.ClientException:
        task_definition = ecs.register_task_definition(
            family=TASK_FAMILY,
            networkMode='bridge',
            containerDefinitions=[
                {
                    'name': 'worker',
                    'image': 'dagster-taskiq-worker:local',
                    'memory': 512,
                    'essential': True,
                    'command': ['dagster-taskiq', 'worker'],
                }
            ],
        )
    arn: str = task_definition['taskDefinition']['taskDefinitionArn']
    services = ecs.describe_services(cluster=cluster, services=[service])['services']
    if not [s for s in services if s.get('status') == 'ACTIVE']:
        ecs.create_service(cluster=cluster, serviceName=service, taskDefinition=arn, desiredCount=0)
    return arn


@dataclass
class Task:
    worker: WorkerProcess
    arn: str | None = None  # registered once the worker serves
    stopping: bool = False
    proxies: dict[str, FaultProxy] = field(default_factory=dict)  # link name -> its proxy


def through(url: str, proxy: FaultProxy) -> str:
    """`url` with its host and port replaced by the proxy's (credentials and path kept)."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition('@')[0]
    netloc = f'{credentials}@127.0.0.1:{proxy.port}' if credentials else f'127.0.0.1:{proxy.port}'
    return urlunsplit(parts._replace(netloc=netloc))


def url_address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or '127.0.0.1', parts.port or DEFAULT_PORTS[parts.scheme.split('+')[0]]


class LocalEcsAgent:
    def __init__(
        self,
        ecs: Any,
        cluster: str,
        service: str,
        log_dir: Path,
        worker_args: tuple[str, ...] = (),
        preload: tuple[str, ...] = (),
        links: dict[str, str] | None = None,
    ) -> None:
        """`links`: link name ('sqs', 'store') -> the URL each worker reaches through a proxy."""
        self.ecs = ecs
        self.links = links or {}
        self.cluster = cluster
        self.service = service
        self.log_dir = log_dir
        self.worker_args = worker_args
        self.preload = preload
        self.task_definition = bootstrap_ecs(ecs, cluster, service)
        self.tasks: list[Task] = []
        self.started = 0

    def desired_count(self) -> int:
        services = self.ecs.describe_services(cluster=self.cluster, services=[self.service])
        return int(services['services'][0]['desiredCount'])

    def reconcile(self) -> None:
        """One pass: reap exited workers, start missing ones, stop surplus ones."""
        for task in [t for t in self.tasks if t.worker.process.poll() is not None]:
            self._deregister(task)
        for task in [t for t in self.tasks if t.arn is None and 'worker_started' in t.worker.log()]:
            self._register(task)
        desired = self.desired_count()
        live = [t for t in self.tasks if not t.stopping]
        for _ in range(desired - len(live)):
            self._start()
        for task in live[desired:] if len(live) > desired else []:
            task.stopping = True
            task.worker.process.send_signal(signal.SIGTERM)
            log.info('task_stopping', task=task.arn, worker_id=task.worker.worker_id)

    def _start(self) -> None:
        worker_id = f'{self.service}-{self.started}'
        self.started += 1
        proxies = {name: FaultProxy(*url_address(url)) for name, url in self.links.items()}
        for proxy in proxies.values():
            proxy.start()
        env = {LINK_VARIABLES[name]: through(self.links[name], p) for name, p in proxies.items()}
        worker = spawn_worker(
            worker_id, self.log_dir, *self.worker_args, preload=self.preload, env=env
        )
        self.tasks.append(Task(worker=worker, proxies=proxies))
        log.info('task_starting', worker_id=worker_id, pid=worker.process.pid)

    def apply_partitions(self) -> None:
        """Set each worker's links to what the partitions file says (pass where it says none)."""
        path = self.log_dir / PARTITIONS_FILE
        try:
            written = json.loads(path.read_text()) if path.exists() else {}
            wanted = {
                worker: {link: Mode(mode) for link, mode in cuts.items()}
                for worker, cuts in written.items()
            }
        except (OSError, ValueError, AttributeError) as error:  # not {worker: {link: mode}}
            log.warning('partitions_unreadable', path=str(path), error=str(error))
            return
        for task in self.tasks:
            cuts = wanted.get(task.worker.worker_id, {})
            for name, proxy in task.proxies.items():
                mode = cuts.get(name, Mode.PASS)
                if proxy.mode is mode:
                    continue
                if mode is Mode.PASS and proxy.mode is Mode.DROP:
                    proxy.set_mode(Mode.RESET)  # the dropped connections end; new ones pass
                proxy.set_mode(mode)
                log.info('link_set', worker_id=task.worker.worker_id, link=name, mode=str(mode))

    def _register(self, task: Task) -> None:
        response = self.ecs.run_task(
            cluster=self.cluster,
            taskDefinition=self.task_definition,
            startedBy=started_by(self.service),
            launchType='FARGATE',
        )
        task.arn = response['tasks'][0]['taskArn']
        worker = task.worker
        log.info('task_started', task=task.arn, worker_id=worker.worker_id, pid=worker.process.pid)

    def _deregister(self, task: Task) -> None:
        self.tasks.remove(task)
        for proxy in task.proxies.values():
            proxy.stop()
        code = task.worker.process.returncode
        how = 'after SIGTERM' if task.stopping else 'unexpectedly'
        if task.arn is not None:
            self.ecs.stop_task(
                cluster=self.cluster, task=task.arn, reason=f'worker exited {how} with code {code}'
            )
        event = 'task_stopped' if task.stopping else 'task_exited_unexpectedly'
        log.info(event, task=task.arn, worker_id=task.worker.worker_id, exit_code=code)

    def stop_all(self) -> None:
        for task in self.tasks:
            task.stopping = True
        for task in list(self.tasks):
            task.worker.stop()
            self._deregister(task)

    def run(self, poll_interval_s: float) -> None:
        """Reconcile every `poll_interval_s` until SIGTERM/SIGINT, then stop every worker."""
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        log.info('ecs_agent_started', cluster=self.cluster, service=self.service)
        next_reconcile = 0.0
        try:
            while not stop.is_set():
                if time.monotonic() >= next_reconcile:
                    next_reconcile = time.monotonic() + poll_interval_s
                    try:
                        self.reconcile()
                    except (BotoCoreError, ClientError) as error:
                        log.warning('reconcile_failed', error=str(error))  # next poll tries again
                if self.links:
                    self.apply_partitions()
                stop.wait(PARTITION_POLL_S if self.links else poll_interval_s)
        finally:
            self.stop_all()
            log.info('ecs_agent_stopped')
