"""The lab: the fleet simulator, benchmarks, fault runners, embedded servers and the demo.

Outside ``services`` (what production runs); the ``pumpwatch`` commands ``demo``, ``simulate``
and ``bench`` import it lazily, and its dependencies are the ``lab`` extra."""
