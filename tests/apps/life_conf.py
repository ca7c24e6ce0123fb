"""Gunicorn config for lifecycle tests: every gunicorn-ext setting from the environment."""

import os

import gunicorn_ext

env = os.environ.get
bind = env("BIND")
workers = int(env("WORKERS", "2"))
worker_class = env("WORKER_CLASS", "gthread")
threads = 4 if worker_class == "gthread" else 1  # threads > 1 turns sync into gthread
timeout = int(env("TIMEOUT", "30"))
graceful_timeout = 5

gunicorn_ext.enable(
    globals(),
    restart_delay=float(env("RESTART_DELAY", "0.1")),
    restart_max_delay=float(env("RESTART_MAX_DELAY", "15")),
    restart_min_uptime=float(env("MIN_UPTIME", "1")),
    restart_breaker_failures=int(env("BREAKER_FAILURES", "10")),
    restart_breaker_window=60.0,
    restart_breaker_cooldown=float(env("BREAKER_COOLDOWN", "30")),
    restart_breaker_max_cooldown=float(env("BREAKER_MAX_COOLDOWN", "300")),
    restart_breaker_scope=env("BREAKER_SCOPE", "slot"),
    restart_breaker_action=env("BREAKER_ACTION", "hold"),
    halt_on_boot_error=env("HALT_ON_BOOT_ERROR", "1") == "1",
    memory_soft_limit=env("MEMORY_SOFT", "0"),
    memory_hard_limit=env("MEMORY_HARD", "0"),
    memory_hard_grace=2.0,
    memory_check_interval=0.2,
    max_lifetime=float(env("MAX_LIFETIME", "0")),
    max_lifetime_jitter=float(env("MAX_LIFETIME_JITTER", "0")),
    reload_ready_timeout=float(env("READY_TIMEOUT", "20")),
    stats_interval=0.2,
    worker_ports_base=int(env("WORKER_PORTS_BASE", "0")),
    hup=env("HUP", "gunicorn"),
    even_spread=env("EVEN_SPREAD", "1") == "1",
    request_timeout=float(env("REQUEST_TIMEOUT", "0")),
)
