"""Deployment material shipped with ppsehr: the benchmark consortia (`ppsehr.deploy.consortia`).

The rest of `deploy/` (Dockerfile, compose files, systemd units, a site configuration) is the
deployment kit described in deploy/README.md; it holds no Python code.
"""
