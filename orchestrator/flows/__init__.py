"""The flows a job runs: stages (teacher, soft targets, students) composed by the pipeline, assistant chains, born-again generations, sweeps, and each student scored against its twin.

Nothing is imported here: import the module you need (each says what it is for)."""
