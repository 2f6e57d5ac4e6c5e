"""``cmm dashboard``: a local web page over the usage store and the running cmm's live counters."""
