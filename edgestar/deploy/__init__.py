"""Deployment commands (bench, firmware) will live here."""
