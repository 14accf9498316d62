"""The browser app (server-rendered pages on top of the API\x27s database and models)."""
