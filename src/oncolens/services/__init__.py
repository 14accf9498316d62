"""The use cases every edge shares (API, web pages, compat routes, CLI): cases, users, analysis.

Each call writes its own audit event and raises the domain errors of ``oncolens.errors``, which
every edge maps to its own answer. Services import the core, never an edge.
"""
