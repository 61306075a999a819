"""MLflow and the console: runs, params, metrics, models, plots, summary tables, progress lines.

Nothing is imported here: import the module you need (each says what it is for)."""
