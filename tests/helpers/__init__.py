"""Module-level helpers shared by the tiers' halves of one concept (one module per concept)."""
