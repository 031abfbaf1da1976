"""A chat built on the hub's Python hooks: users, rooms and messages in SQLite or PostgreSQL.

    pip install -e '.[chat]'
    python -m examples.chat_app        # the hub, and the chat page on http://127.0.0.1:8000/

The hooks alone run in ``wirehub serve``, with any of its options (brokers, workers, TLS,
tokens), the page then served by any static server from this folder::

    wirehub serve --app examples.chat_app:hub

``CHAT_DATABASE`` picks the database: a SQLite file's path (``chat.db`` by default, created
with three users and two rooms) or a ``postgresql://`` URL. ``app.py`` has the hooks and
what clients see; ``store.py`` the tables and queries; ``chat.html`` the page.
"""

from .app import ChatApp, chat, hub

__all__ = ["ChatApp", "chat", "hub"]
