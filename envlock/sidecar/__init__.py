"""The sidecar folder: its store, typed manifest, arrays, captured custom code, and trust."""
