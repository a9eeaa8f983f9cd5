"""ppsehr.server."""
