"""What a compiled directory holds, read bounded and checked (manifest, tensor files, the host
arena of expert blobs, tokenizer and chat template), and the memory budgets that size the cache."""
