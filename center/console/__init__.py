"""The operations console: a page on center over a few admin JSON routes."""

from center.console.routes import add_console_routes

__all__ = ["add_console_routes"]
