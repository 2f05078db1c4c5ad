"""Secure aggregation (SecAgg+ on Flower's pieces): `protocol` (the math and crypto),
`encoding` (a LoRA update as integers), `device` (the device's stages and TRAIN mod),
`server` (one round over a Grid)."""
