"""The routing predictors the runtime runs (routing path, routing tables, reuse) and the
routing prior the predictive policy reads."""
