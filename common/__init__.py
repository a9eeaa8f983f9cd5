"""ppsehr.common."""
