"""The server process: start-up checks, logging, CPU threads, returning memory."""
