"""Helpers for your own tests of code that enqueues jobs and of your executors.

* :func:`perform` (and :func:`perform_async`): run one executor in-process, without a
  database, and assert on how the attempt ended (:class:`Performed`).
* :func:`drain` (and :func:`drain_async`): run every due job against a real database
  in the test's process, with the real claim and completion; counts by outcome
  (:class:`Drained`).
* :func:`assert_enqueued`, :func:`refute_enqueued`, :func:`all_enqueued`: what your
  code enqueued, payloads matched by subset.
* pytest fixtures (``dispatcher_client``, ``dispatcher_drain``, ...), loaded
  automatically: see :mod:`dispatcher.testing.pytest_plugin`.
"""

from dispatcher.testing.drain import Drained, DrainOptions, drain, drain_async
from dispatcher.testing.enqueued import all_enqueued, assert_enqueued, refute_enqueued
from dispatcher.testing.perform import JobFields, Performed, perform, perform_async

__all__ = [
    "DrainOptions",
    "Drained",
    "JobFields",
    "Performed",
    "all_enqueued",
    "assert_enqueued",
    "drain",
    "drain_async",
    "perform",
    "perform_async",
    "refute_enqueued",
]
