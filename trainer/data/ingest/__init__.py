"""Getting the user's training sources onto local disk: http(s), S3, local paths, and the archives inside them."""
