"""Real drivers against real servers, greenified: the compatibility table's proofs."""
