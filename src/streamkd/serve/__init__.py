"""``streamkd serve``: a websocket server for live streaming recognition
and the browser page it serves (``static/``)."""
from streamkd.serve.server import ServeLimits, ServerThread, StreamServer

__all__ = ["ServeLimits", "ServerThread", "StreamServer"]
