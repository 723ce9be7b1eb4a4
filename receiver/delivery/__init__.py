"""Outgoing webhooks: everything between the outbox and a subscriber's endpoint.

signing.py     Standard Webhooks headers (the `standardwebhooks` library signs)
urlguard.py    which URLs may be called, checked at creation and at connect time
sender.py      the HTTP seam: one keep-alive client, no redirects, guarded connects
schedule.py    retry delays: the configured schedule, jitter, Retry-After
breaker.py     a circuit breaker per endpoint
dispatcher.py  claims due deliveries from the store and sends them
"""
