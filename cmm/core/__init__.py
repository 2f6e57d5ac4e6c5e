"""The pure core: bytes and text in, values out; no IO and no Twisted."""
