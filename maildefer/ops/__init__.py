"""Running under a service manager: systemd notification and sockets, Prometheus metrics.

:mod:`.systemd` speaks ``sd_notify`` (READY, STATUS, WATCHDOG, STOPPING) and adopts
socket-activated listeners; :mod:`.metrics` counts what serve and workers do and serves
the counts; :mod:`.lifecycle` is what both daemons share around their run: signals,
readiness, status lines and the watchdog.
"""
