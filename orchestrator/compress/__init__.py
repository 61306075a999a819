"""After distillation: quantize, measure size and latency, export.

Nothing is imported here: import the module you need (each says what it is for)."""
