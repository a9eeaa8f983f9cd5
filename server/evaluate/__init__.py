"""Federated evaluation of a release under DP: the coordinator's side (docs/evaluation.md)."""
