"""esms-callback-poller: keeps a Postgres `messages` table true to eSMS.vn's Zalo ZNS callbacks.

The data path, one module each: settings → store (the messages table) → scheduler (claim due
RefIds) → esms_client (the provider's wire format) → ratelimit (shared GCRA) → poller/tasks (one
poll) → merge (forward-only upsert rules). The Celery app is `worker.celery:app`, which
`celery -A worker ...` finds by itself. A bare `celery -A worker worker` runs on Celery's gevent
pool: `worker.green` re-executes it with `--pool=gevent` before anything else is imported.
"""

from worker.green import reexec_on_gevent

reexec_on_gevent()
