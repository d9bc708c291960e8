"""The embedded CPU testbed: a tiny model on a verifiable task, trained with stale rollouts through
the same loss functions (verl's registry) and the same `StaleRolloutBuffer` as the verl path."""
