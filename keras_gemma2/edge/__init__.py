"""The library side of on-device export: plan, traced signatures, LiteRT weight stitching."""
