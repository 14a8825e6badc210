"""Load tools: `bench/flood.py` (the load tester) and `bench/ws_peer.py` (a comparison peer)."""
