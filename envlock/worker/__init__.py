"""The worker: the host's client, and the payload that runs inside the locked environment."""
