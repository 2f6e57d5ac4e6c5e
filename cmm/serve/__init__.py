"""What a worker imports to serve a connection: the proxy protocol, upstreams, TLS, DNS, the request log."""
