"""Storage: the database (tables, migrations), the image store (files, S3), backup and restore."""
