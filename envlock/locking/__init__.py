"""Locks: installed packages to requirements/pylock, conda-lock, the wheel choice, vendoring."""
