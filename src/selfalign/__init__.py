"""SelfAlign: persona YAML -> synthetic SFT data -> LoRA adapter -> evaluation -> hot-swap."""

__version__ = "0.1.0"
