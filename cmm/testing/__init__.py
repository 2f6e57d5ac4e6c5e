"""Fakes and process helpers that tests and the benchmark share; never imported by the product."""
