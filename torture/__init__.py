"""Crash torture for lockd: crash it constantly, cheaply, and judge it from outside.

Run it with ``make torture`` (``TORTURE_ARGS='--cycles N --seed S --duration SECONDS ...'``)
or ``.venv/bin/python -m torture --help``. Theory of operation, by module:

- :mod:`torture.run`: the cycle loop (run -> crash -> restart -> check), the killer's seeded
  plans (a random SIGKILL/SIGABRT, or every failpoint of ``lockd.failpoint.POINTS`` in turn),
  the report and the exit status;
- :mod:`torture.workload`: owner processes (some die on their own), client threads doing
  random acquire / release / release-all, shared and exclusive, over a pool of files, and the
  model of what the clients were told;
- :mod:`torture.competitor`: a process that grabs free pool files with ``F_OFD_SETLK`` and
  logs when it held what, so that a recovery gap shows up as lost leases and every lost
  lease can be matched to a real grab;
- :mod:`torture.checker`: after every recovery, the clients' view, the daemon's
  (ListLeases, History, Status, ``lockctl locks -J``) and the kernel's (/proc/locks,
  ``F_OFD_GETLK``) must agree; each disagreement is a named violation;
- :mod:`torture.kernel`: the two kernel readings; :mod:`torture.daemonctl`: starting and
  killing lockd, readiness over ``$NOTIFY_SOCKET``, the checker's own Varlink call;
- :mod:`torture.multihost`: ``--hosts 2``, two lockds on one real GlusterFS volume, crashes
  and storage resets of either host, every check made through both mounts;
- :mod:`torture.zygote`: a fork server that starts a pre-imported daemon in ~50 ms instead
  of ~350 ms (``--spawn exec`` starts ``python -m lockd.daemon`` each time instead).

Violations are named. The checker's (after every recovery) are listed in
:mod:`torture.checker`; the clients check every answer as it comes (:mod:`torture.workload`):
``idempotency`` (a repeat changed its token), ``token-went-back`` / ``token-reused`` (a new
grant's token not above every token acknowledged before it was asked for, or seen before),
``conflicting-grant`` (two live owners hold conflicting leases), ``repeat-busy``,
``release-not-held``, ``released-never-granted``, ``release-all-incomplete``,
``lost-not-granted``, ``owner-forgotten`` (NoSuchOwner for a live owner),
``unexpected-error`` (an error the call cannot give, e.g. an internal error) and
``unreachable``; the loop's (:mod:`torture.run`): ``daemon-died`` (a death nobody caused),
``start-failed``, ``clean-stop`` (SIGTERM did not exit 0) and ``stuck``.

On a violation the harness stops (``--keep-going`` to go on), exits 1 and keeps its work
directory (``results/torture/<time>-seed<S>/``): ``state/journal.sqlite`` as the daemon
left it, ``daemon.log`` (every start's stderr) and ``torture.log`` (every operation and its
answer, every crash and check, the violation).
"""
