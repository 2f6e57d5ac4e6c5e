"""Usage records that outlast a run: the store, its queries, and what reads them."""
