"""Accounts and security: passwords and tokens, two-factor codes, e-mail."""
