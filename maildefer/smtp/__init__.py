"""The SMTP side: one asyncio listener, one aiosmtpd session per connection.

:mod:`.policy` decides (RCPT acceptance, the DATA path into the router, limits and
replies) through aiosmtpd's public handler hooks only; :mod:`.session` is the protocol
engine, every use of aiosmtpd's internals in one place; :mod:`.server` is the listener's
lifecycle (bind or adopt sockets, serve, drain).
"""
