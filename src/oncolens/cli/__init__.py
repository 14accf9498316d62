"""Edge: the ``oncolens`` command line."""
