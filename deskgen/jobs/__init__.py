"""Jobs for integrators (issue 25): asynchronous generation on Ray Serve's task consumers over Redis,
idempotency keys, signed webhooks.

    idempotency.py  Idempotency-Key on POST (IETF draft): claim, replay, 409, 422, per API key (Redis)
    runner.py       one job start to end: images, progress, cancel at the next step, redelivery, webhooks
    store.py        job records in Redis: status, position, progress, results, events, cancel, retention
    webhooks.py     webhook targets (allow-list) and signed at-least-once deliveries with backoff
"""
