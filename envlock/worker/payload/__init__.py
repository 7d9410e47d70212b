"""The worker: runs inside the locked environment, put on its sys.path by the host.

Everything in this package imports only the standard library, numpy and the model's
framework, and runs on Python 3.8 and newer (no 3.9+ syntax, no envlock host imports).
"""
