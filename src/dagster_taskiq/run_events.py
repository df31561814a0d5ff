"""Wake a run worker when one of its steps ends instead of polling the event log on a timer.

A worker's fenced finish, which writes the attempt's terminal event, NOTIFYs the run's own
channel, `step_ends_channel(run_id)` (besides dagster-postgres's own `run_events`, which every
event of every run notifies: waking on those would cost a look at the event log for each of a
step's ~11 events; and one channel for all runs would wake each run worker for every step of every
other run). The run worker LISTENs on one connection of its own; a missed
notification only costs the fallback poll interval, so any database error here is logged, waited
out, and the connection made again at the next wait.
"""

import hashlib
import select
import time

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

from dagster_taskiq.logs import get_logger

log = get_logger(__name__)

STEP_ENDS_CHANNEL_PREFIX = 'dagster_taskiq_step_ends_'  # + md5(run id): see step_ends_channel
CONNECT_TIMEOUT_S = 2
RECONNECT_AFTER_S = 5.0


def step_ends_channel(run_id: str) -> str:
    """The channel the queries finish and cancelled_event NOTIFY a run's step ends on (a run id
    of any length fits PostgreSQL's 63-byte limit on a channel's name through its md5)."""
    return STEP_ENDS_CHANNEL_PREFIX + hashlib.md5(run_id.encode()).hexdigest()


def _readable_within(fd: int, timeout_s: float) -> bool:
    """Whether `fd` has something to read (or has hung up) within `timeout_s`."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout_s * 1000))


class RunEvents:
    """Waits, at most a given time, for the next end of a step of one run."""

    def __init__(self, postgres_url: str, run_id: str) -> None:
        # dagster-postgres's URL names SQLAlchemy's driver (postgresql+psycopg2://), libpq's not
        url = make_url(postgres_url).set(drivername='postgresql')
        self.postgres_url = url.render_as_string(hide_password=False)
        self.run_id = run_id
        self.connection: psycopg.Connection[tuple[object, ...]] | None = None
        self.connect_after = 0.0  # time.monotonic() before which no new connection is tried

    def _listening(self) -> psycopg.Connection[tuple[object, ...]] | None:
        if self.connection is None and time.monotonic() >= self.connect_after:
            self.connect_after = time.monotonic() + RECONNECT_AFTER_S
            self.connection = psycopg.connect(
                self.postgres_url,
                autocommit=True,
                connect_timeout=CONNECT_TIMEOUT_S,
                # cut off without a word (packets dropped), it errors within ~10 s, not never
                keepalives=1,
                keepalives_idle=5,
                keepalives_interval=2,
                keepalives_count=2,
            )
            channel = sql.Identifier(step_ends_channel(self.run_id))
            self.connection.execute(sql.SQL('LISTEN {}').format(channel))
        return self.connection

    def wait(self, timeout_s: float) -> bool:
        """Whether a step of the run ended (since the last wait) within `timeout_s`.

        Blocks in poll() on the connection's socket: psycopg's own `notifies(timeout)` wakes
        every 0.1 s (~3 ms of CPU a second), which 50 runs waiting in a backlog would pay each.
        (Not select(): it refuses a descriptor above 1023, which a busy run process may hold.)
        """
        deadline = time.monotonic() + timeout_s
        try:
            connection = self._listening()
            while connection is not None:
                # a notification comes after its event's commit: the next read of the event log
                # sees that event, and any other of the run stored before it
                if any(notify.payload == self.run_id for notify in connection.notifies(timeout=0)):
                    return True
                left_s = deadline - time.monotonic()
                if left_s <= 0 or not _readable_within(connection.fileno(), left_s):
                    return False
        except psycopg.Error as error:
            log.warning('run_events_unavailable', error=str(error), retry_in_s=RECONNECT_AFTER_S)
            self.close()
        time.sleep(max(0.0, deadline - time.monotonic()))
        return False

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None
