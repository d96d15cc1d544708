"""What the server and its clients share, without torch: per-unit result sums (and, as the layout
settles, the evaluation settings and the HTTP models). Nothing here imports torch, FastAPI or the engine.
"""
