"""Package indexes: the one HTTP client, the simple API and its cache."""
