"""Built-in models: the preset catalog, the config shrinker and its rules, and the trained preset."""
