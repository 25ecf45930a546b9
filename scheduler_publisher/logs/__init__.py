"""Logging at the bottom of the package: structlog set-up (setup.py), the ECS shape of a
line (ecs.py), redaction, and the outputs (stdout, the rotated file). Imports nothing else
of the package.
"""
