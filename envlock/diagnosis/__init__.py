"""Why predictions differ: output comparison and the cause-ranking rules."""
