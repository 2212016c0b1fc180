"""Several Trellis nodes on one PostgreSQL database: what they tell each other."""
