"""Private instances of real services on free loopback ports.

Used by `camfleet up`, the test fixtures (tests/conftest.py) and the benchmarks. Each
class is a context manager with start(), stop() (graceful), kill() (SIGKILL, for
fault injection), restart() (same port, same data) and close() (stop and delete its
temp directory). Everything binds 127.0.0.1 only. See each module for what it exposes.
"""

from ._base import (
    LOOPBACK,
    CommandError,
    LocalService,
    ServiceStartError,
    free_port,
    port_open,
    run_command,
)
from .mosquitto import MosquittoInstance
from .postgres import PostgresInstance
from .prefect_server import PrefectServerInstance
from .s3 import S3Instance
from .sshd import SshdInstance

__all__ = [
    "LOOPBACK",
    "CommandError",
    "LocalService",
    "MosquittoInstance",
    "PostgresInstance",
    "PrefectServerInstance",
    "S3Instance",
    "ServiceStartError",
    "SshdInstance",
    "free_port",
    "port_open",
    "run_command",
]
