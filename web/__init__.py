"""The Flask API. ``create_app()`` only wires things; each area lives in its own blueprint."""

from __future__ import annotations

from typing import Any

from flask import Flask

from web import errors


def create_app(config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__)
    app.config.from_mapping(JSON_SORT_KEYS=False, MAX_CONTENT_LENGTH=8 * 1024 * 1024)
    if config:
        app.config.update(config)

    errors.init_app(app)

    from web import accounts

    accounts.init_app(app)  # ledger + payment provider from config (DATABASE_URL, AZU_PAYMENT_PROVIDER...)

    from web.health import bp as health_bp
    from web.jobs import bp as jobs_bp
    from web.openai import bp as openai_bp
    from web.registry import bp as registry_bp

    app.register_blueprint(health_bp)
    app.register_blueprint(jobs_bp)
    app.register_blueprint(openai_bp)
    app.register_blueprint(registry_bp)
    return app
