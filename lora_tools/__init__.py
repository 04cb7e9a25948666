"""lora_tools: turn SDXL checkpoints into few-step Lightning models; inspect, convert and fuse LoRAs."""

__version__ = "0.1.0"
