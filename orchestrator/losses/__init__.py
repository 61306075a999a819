"""Student losses: pure tensor functions (hinton, logit, feature; their checks in checks), the one
registry of terms a config names (terms: parameters, what each reads, what it computes), and the
objective a train worker sums them in (objective). Nothing is imported here, so the config can
import `orchestrator.losses.terms` without torch."""
