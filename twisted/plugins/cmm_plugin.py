"""twistd plugin: ``twistd cmm`` runs the interceptor (see cmm.daemon.tap)."""

from twisted.application.service import ServiceMaker

cmm = ServiceMaker("cmm", "cmm.daemon.tap", "Route Claude Code models by name to another server.", "cmm")
