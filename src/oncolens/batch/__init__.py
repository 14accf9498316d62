"""Edge: screening a folder or an S3 prefix, locally or on a Ray cluster."""
