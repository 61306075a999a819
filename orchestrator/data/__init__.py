"""Where examples come from: the bundled datasets, parquet sources, splits, and the views a soft-target cache can store.

Nothing is imported here: import the module you need (each says what it is for)."""
