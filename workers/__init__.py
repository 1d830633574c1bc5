"""The Celery app. Thin: tasks receive, call azu, send on. ``celery -A workers worker -Q <queue>``."""

from __future__ import annotations

from celery import Celery

app = Celery("workers", include=["workers.payouts"])
app.config_from_object("celeryconfig")
