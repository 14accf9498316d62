"""What the HTTP edges (the API and the web pages) share: dependencies, error mapping, uploads,
responses, middleware and the inference batcher. Below both edges; it imports neither."""
