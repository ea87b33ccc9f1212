"""Pure domain code: the wire contract, sequence bookkeeping, therapy arithmetic. No I/O."""
