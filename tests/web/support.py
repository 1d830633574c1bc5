"""Helpers of the web page tests (imported by tests/web's conftest and test modules; a conftest is never
imported by a test module). Candidates for tests/support/web.py."""

from __future__ import annotations

from flask import Flask

MODEL_ID = "azu-demo"


def with_pages(app: Flask) -> Flask:
    """The app with the pages blueprint (registered here until web/__init__.py registers it)."""
    if "pages" not in app.blueprints:
        from web.pages import bp

        app.register_blueprint(bp)
    return app
