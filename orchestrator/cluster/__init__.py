"""Running on Ray: the local embedded Ray, checks against the cluster, job submission, interrupts.

Nothing is imported here: import the module you need (each says what it is for)."""
