"""The real-time hub: rooms, presence, history, auth — an app on the wirehub framework.

``wirehub serve`` runs it; :class:`Hub` embeds it in your own process.
"""

from .app import HubApp
from .embed import Hub

__all__ = ["Hub", "HubApp"]
