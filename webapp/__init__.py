"""The page, the JSON API and the lobby (`WS /ws/session`)."""

from webapp.app import create_app

__all__ = ["create_app"]
