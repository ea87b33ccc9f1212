"""The fleet simulator: contract messages for N pumps, deterministic for a seed.

``fleet`` holds the pure model (``Fleet``, ``Fault``, ``Outgoing``); ``publisher`` sends its
messages to a broker; ``command`` is what ``pumpwatch simulate`` runs.
"""
