"""LSP in, one service call, LSP out: the only code besides server.py that knows pygls and lsprotocol."""
