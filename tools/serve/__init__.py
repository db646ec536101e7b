"""expertflow-serve's HTTP side: OpenAI's request and response shapes (protocol.py) and the ASGI app (app.py)."""
