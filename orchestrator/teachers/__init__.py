"""Teachers: the Ray actor pool that predicts soft targets, the in-worker online teacher, and the caches (soft targets per view, trained weights) with their manifests.

Nothing is imported here: import the module you need (each says what it is for)."""
