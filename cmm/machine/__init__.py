"""Root-only work on the machine: certificates, the hosts file, DNS flush, trust stores, shell profiles."""
