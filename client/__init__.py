"""ppsehr.client."""
