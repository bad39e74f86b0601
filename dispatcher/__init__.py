"""dispatcher: a Postgres-native, leader-elected background job dispatcher.

The public API; everything else is internal.
"""

from dispatcher.app import App
from dispatcher.async_client import AsyncClient
from dispatcher.client import Client
from dispatcher.errors import (
    ConfigError,
    DispatcherError,
    InvalidArgument,
    InvalidJob,
    InvalidTransition,
    JobNotFound,
    MigrationError,
    PermanentError,
    QueueFull,
    RetryAfter,
    SchemaNotReady,
    Snooze,
)
from dispatcher.job import Job
from dispatcher.jobs import JobRecord, JobStatus
from dispatcher.producer import ClusterStatus, JobType
from dispatcher.retry import RetryPolicy

__version__ = "0.1.0"

__all__ = [
    "App",
    "AsyncClient",
    "Client",
    "ClusterStatus",
    "ConfigError",
    "DispatcherError",
    "InvalidArgument",
    "InvalidJob",
    "InvalidTransition",
    "Job",
    "JobNotFound",
    "JobRecord",
    "JobStatus",
    "JobType",
    "MigrationError",
    "PermanentError",
    "QueueFull",
    "RetryAfter",
    "RetryPolicy",
    "SchemaNotReady",
    "Snooze",
    "__version__",
]
