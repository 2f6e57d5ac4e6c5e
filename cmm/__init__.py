"""cmm: route chosen Claude Code models to another Anthropic-compatible server."""
