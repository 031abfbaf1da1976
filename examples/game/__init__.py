"""A real-time multiplayer game on wirehub: a server-authoritative 30 Hz world that UDP
players (``client.py``, ``bots.py``) and WebSocket players (the page in ``web/``) share.
See README.md in this folder."""
