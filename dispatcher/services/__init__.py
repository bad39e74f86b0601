"""The services a replica runs, in the order a job meets them.

A producer's INSERT wakes the ``notifier`` (LISTEN, on the connection the ``elector``
leads on); the leader's ``dispatch`` claim loop, woken through ``wakeup``, claims due
jobs into ``slots``; each claimed attempt runs in ``executor`` (the executor function
receives a ``job.Job``); its outcome is written in batches by the ``completer``, which
frees its slot. Meanwhile ``job_heartbeat`` keeps running attempts alive, and the
leader's ``reaper``, ``periodic`` scheduler and ``queue_stats`` keep house;
``replicas`` registers the process. ``dispatcher.runtime`` builds and wires them.
"""
