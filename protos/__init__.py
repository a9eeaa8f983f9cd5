"""ppsehr.protos."""
