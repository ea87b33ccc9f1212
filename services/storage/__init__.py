"""PostgreSQL: connections and migrations shared by every service."""
