"""Ray Train: the student models, the train loop every worker runs, precision and evaluation.

Nothing is imported here: import the module you need (each says what it is for)."""
