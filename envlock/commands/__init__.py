"""One module per command (save, run, check, diff, export, show) and the results they return."""
