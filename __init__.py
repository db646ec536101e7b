"""The repository root is the ``expertflow`` package as installed: pyproject.toml maps ir/, passes/,
runtime/ and tools/ to its subpackages (the package itself is expertflow_pkg/). This file only lets
tools that read imports resolve the ``..`` of the relative imports between those four folders;
nothing imports it."""
