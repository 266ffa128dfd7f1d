"""The paged KV cache: an integer block allocator, the pool tensor, and the P→D handoff."""
