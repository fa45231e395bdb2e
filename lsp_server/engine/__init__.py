"""The model runs here: a worker process (worker.py, backends.py) and the server's client for it."""
