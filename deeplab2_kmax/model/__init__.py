"""kMaX-DeepLab model: layers, pixel encoders, decoders, heads and the config-driven builder."""
