"""Federation builders (placeholder until written)."""
