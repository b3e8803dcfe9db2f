"""Process-group setup, strategy wrapping, seeding and rank-aware logging (filled in by the launcher issue)."""
