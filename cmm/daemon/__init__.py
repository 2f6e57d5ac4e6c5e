"""The running service: twistd's tap, the master and its workers, the wire between them, live stats."""
