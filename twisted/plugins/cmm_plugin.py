"""twistd plugin: ``twistd cmm`` runs the interceptor (see cmm.service)."""

from twisted.application.service import ServiceMaker

cmm = ServiceMaker("cmm", "cmm.service", "Route Claude Code models by name to another server.", "cmm")
