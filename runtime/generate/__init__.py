"""Running a compiled graph as a transformers causal LM: the model, the ops' context, input
checks, token permutation, batching and request scheduling."""
