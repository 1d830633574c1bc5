"""Verified work: workers commit to what they computed; the core re-computes chosen jobs and withholds the pay
of a worker whose numbers are wrong (design: docs/security.md, "Verified work")."""
