"""SDXL VAE: LDM (``encoder.down.0.block.0``...) <-> diffusers ``AutoencoderKL`` table."""

from __future__ import annotations

from dataclasses import dataclass

from lora_tools.layouts.table import KeyMap, Transform


@dataclass(frozen=True, slots=True)
class VaeConfig:
    """Widths of an SDXL-topology ``AutoencoderKL``."""

    channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    in_channels: int = 3
    latent_channels: int = 4

    def diffusers_config(self) -> dict[str, object]:
        n = len(self.channels)
        return {
            "_class_name": "AutoencoderKL",
            "in_channels": self.in_channels,
            "out_channels": self.in_channels,
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": list(self.channels),
            "layers_per_block": self.layers_per_block,
            "latent_channels": self.latent_channels,
            "norm_num_groups": 32,
            "act_fn": "silu",
            "sample_size": 1024,
            "scaling_factor": 0.13025,
            "force_upcast": True,
        }


class _Builder:
    def __init__(self) -> None:
        self.rows: list[KeyMap] = []

    def add(self, sgm: str, diffusers: str, shape: tuple[int, ...], transform: Transform = "rename") -> None:
        self.rows.append(KeyMap("vae", f"{sgm}.weight", f"{diffusers}.weight", shape, transform))
        self.rows.append(KeyMap("vae", f"{sgm}.bias", f"{diffusers}.bias", (shape[0],)))

    def resnet(self, sgm: str, diffusers: str, cin: int, cout: int) -> None:
        self.add(f"{sgm}.norm1", f"{diffusers}.norm1", (cin,))
        self.add(f"{sgm}.conv1", f"{diffusers}.conv1", (cout, cin, 3, 3))
        self.add(f"{sgm}.norm2", f"{diffusers}.norm2", (cout,))
        self.add(f"{sgm}.conv2", f"{diffusers}.conv2", (cout, cout, 3, 3))
        if cin != cout:
            self.add(f"{sgm}.nin_shortcut", f"{diffusers}.conv_shortcut", (cout, cin, 1, 1))

    def mid(self, sgm: str, diffusers: str, ch: int) -> None:
        self.resnet(f"{sgm}.mid.block_1", f"{diffusers}.mid_block.resnets.0", ch, ch)
        a, d = f"{sgm}.mid.attn_1", f"{diffusers}.mid_block.attentions.0"
        self.add(f"{a}.norm", f"{d}.group_norm", (ch,))
        for s, t in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
            self.add(f"{a}.{s}", f"{d}.{t}", (ch, ch, 1, 1), "conv1x1_to_linear")
        self.resnet(f"{sgm}.mid.block_2", f"{diffusers}.mid_block.resnets.1", ch, ch)


def vae_table(cfg: VaeConfig) -> list[KeyMap]:
    """Every VAE tensor, LDM names against diffusers names."""
    b = _Builder()
    ch, n = cfg.channels, len(cfg.channels)
    b.add("encoder.conv_in", "encoder.conv_in", (ch[0], cfg.in_channels, 3, 3))
    prev = ch[0]
    for i in range(n):
        for j in range(cfg.layers_per_block):
            b.resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", prev, ch[i])
            prev = ch[i]
        if i < n - 1:
            b.add(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv", (ch[i], ch[i], 3, 3))
    b.mid("encoder", "encoder", ch[-1])
    b.add("encoder.norm_out", "encoder.conv_norm_out", (ch[-1],))
    b.add("encoder.conv_out", "encoder.conv_out", (2 * cfg.latent_channels, ch[-1], 3, 3))
    b.add("quant_conv", "quant_conv", (2 * cfg.latent_channels, 2 * cfg.latent_channels, 1, 1))
    b.add("post_quant_conv", "post_quant_conv", (cfg.latent_channels, cfg.latent_channels, 1, 1))
    b.add("decoder.conv_in", "decoder.conv_in", (ch[-1], cfg.latent_channels, 3, 3))
    b.mid("decoder", "decoder", ch[-1])
    rev = list(reversed(ch))
    prev = rev[0]
    for i in range(n):
        ldm = n - 1 - i  # LDM numbers decoder levels from the bottom
        for j in range(cfg.layers_per_block + 1):
            b.resnet(f"decoder.up.{ldm}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}", prev, rev[i])
            prev = rev[i]
        if i < n - 1:
            b.add(f"decoder.up.{ldm}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv", (rev[i], rev[i], 3, 3))
    b.add("decoder.norm_out", "decoder.conv_norm_out", (ch[0],))
    b.add("decoder.conv_out", "decoder.conv_out", (cfg.in_channels, ch[0], 3, 3))
    return b.rows


def vae_config_from_shapes(shapes: dict[str, tuple[int, ...]], prefix: str = "") -> VaeConfig:
    """Read VAE widths from LDM tensor shapes (``prefix`` = ``first_stage_model.``)."""
    chans = []
    i = 0
    while prefix + f"encoder.down.{i}.block.0.conv1.weight" in shapes:
        chans.append(shapes[prefix + f"encoder.down.{i}.block.0.conv1.weight"][0])
        i += 1
    conv_in = shapes[prefix + "encoder.conv_in.weight"]
    return VaeConfig(channels=tuple(chans), in_channels=conv_in[1],
                     latent_channels=shapes[prefix + "post_quant_conv.weight"][0])
