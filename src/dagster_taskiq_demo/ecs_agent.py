"""The local ECS agent: does on this machine what ECS does in AWS for the worker service.

Each poll it reads the service's desiredCount from the emulator and reconciles it into real
`dagster-taskiq worker` processes: starts missing ones, replaces any that exit unexpectedly, and
stops surplus ones with SIGTERM (they drain first). A process is registered as a task (RunTask,
startedBy `ecs-svc/<service>`) once it serves, and deregistered (StopTask) when it exits, so
list-tasks shows the workers really serving: moto's own describe-services reports runningCount
equal to desiredCount whatever runs.
"""

import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from dagster_taskiq.logs import get_logger
from dagster_taskiq_demo.stack import WorkerProcess, spawn_worker

log = get_logger(__name__)

TASK_FAMILY = 'taskiq-worker'


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


class LocalEcsAgent:
    def __init__(
        self,
        ecs: Any,
        cluster: str,
        service: str,
        log_dir: Path,
        worker_args: tuple[str, ...] = (),
        preload: tuple[str, ...] = (),
    ) -> None:
        self.ecs = ecs
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
        worker = spawn_worker(worker_id, self.log_dir, *self.worker_args, preload=self.preload)
        self.tasks.append(Task(worker=worker))
        log.info('task_starting', worker_id=worker_id, pid=worker.process.pid)

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
        try:
            while not stop.is_set():
                try:
                    self.reconcile()
                except (BotoCoreError, ClientError) as error:
                    log.warning('reconcile_failed', error=str(error))  # the next poll tries again
                stop.wait(poll_interval_s)
        finally:
            self.stop_all()
            log.info('ecs_agent_stopped')
