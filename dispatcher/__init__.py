"""dispatcher: a Postgres-native, leader-elected background job dispatcher.

The public API; everything else is internal.
"""

from dispatcher.core.app import App
from dispatcher.core.errors import (
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
from dispatcher.core.records import BulkOptions, EnqueueOptions, JobRecord, JobStatus
from dispatcher.core.retry import RetryPolicy
from dispatcher.core.version import VERSION
from dispatcher.producers.async_client import AsyncClient
from dispatcher.producers.client import Client
from dispatcher.producers.plans import ClusterStatus, JobType
from dispatcher.services.job import Job

__version__ = VERSION

__all__ = [
    "App",
    "AsyncClient",
    "BulkOptions",
    "Client",
    "ClusterStatus",
    "ConfigError",
    "DispatcherError",
    "EnqueueOptions",
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
