"""SDXL UNet: SGM (``input_blocks``...) <-> diffusers (``down_blocks``...) table, from structure."""

from __future__ import annotations

from dataclasses import dataclass

from lora_tools.layouts.table import KeyMap

_RESNET_RENAMES = (  # SGM name, diffusers name
    ("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut"),
)


@dataclass(frozen=True, slots=True)
class UnetConfig:
    """Block structure and widths of an SDXL-topology UNet.

    ``depths[i]`` is the number of transformer blocks in each attention of level ``i``
    (0 = no attention at that level); ``mid_depth`` the middle block's.
    """

    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4)
    depths: tuple[int, ...] = (0, 2, 10)
    mid_depth: int = 10
    layers_per_block: int = 2
    in_channels: int = 4
    out_channels: int = 4
    context_dim: int = 2048
    adm_in_channels: int = 2816
    head_dim: int = 64
    addition_time_embed_dim: int = 256

    @property
    def channels(self) -> list[int]:
        return [self.model_channels * m for m in self.channel_mult]

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    def diffusers_config(self) -> dict[str, object]:
        """The ``UNet2DConditionModel`` config for this structure (SDXL conventions)."""
        return {
            "_class_name": "UNet2DConditionModel",
            "sample_size": 128,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in self.depths],
            "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(self.depths)],
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "block_out_channels": self.channels,
            "layers_per_block": self.layers_per_block,
            "transformer_layers_per_block": [max(d, 1) for d in self.depths],
            "attention_head_dim": [max(c // self.head_dim, 1) for c in self.channels],
            "cross_attention_dim": self.context_dim,
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": self.addition_time_embed_dim,
            "projection_class_embeddings_input_dim": self.adm_in_channels,
            "norm_num_groups": 32,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "act_fn": "silu",
            "upcast_attention": False,
            "center_input_sample": False,
        }


class _Builder:
    def __init__(self) -> None:
        self.rows: list[KeyMap] = []

    def add(self, sgm: str, diffusers: str, shape: tuple[int, ...], bias: bool = True) -> None:
        self.rows.append(KeyMap("unet", f"{sgm}.weight", f"{diffusers}.weight", shape))
        if bias:
            self.rows.append(KeyMap("unet", f"{sgm}.bias", f"{diffusers}.bias", (shape[0],)))

    def norm(self, sgm: str, diffusers: str, ch: int) -> None:
        self.add(sgm, diffusers, (ch,))

    def resnet(self, sgm: str, diffusers: str, cin: int, cout: int, temb: int) -> None:
        names = dict(_RESNET_RENAMES)
        self.norm(f"{sgm}.in_layers.0", f"{diffusers}.{names['in_layers.0']}", cin)
        self.add(f"{sgm}.in_layers.2", f"{diffusers}.conv1", (cout, cin, 3, 3))
        self.add(f"{sgm}.emb_layers.1", f"{diffusers}.time_emb_proj", (cout, temb))
        self.norm(f"{sgm}.out_layers.0", f"{diffusers}.norm2", cout)
        self.add(f"{sgm}.out_layers.3", f"{diffusers}.conv2", (cout, cout, 3, 3))
        if cin != cout:
            self.add(f"{sgm}.skip_connection", f"{diffusers}.conv_shortcut", (cout, cin, 1, 1))

    def attention(self, sgm: str, diffusers: str, ch: int, depth: int, ctx: int) -> None:
        self.norm(f"{sgm}.norm", f"{diffusers}.norm", ch)
        self.add(f"{sgm}.proj_in", f"{diffusers}.proj_in", (ch, ch))
        for k in range(depth):
            s, d = f"{sgm}.transformer_blocks.{k}", f"{diffusers}.transformer_blocks.{k}"
            for attn, kv in (("attn1", ch), ("attn2", ctx)):
                self.add(f"{s}.{attn}.to_q", f"{d}.{attn}.to_q", (ch, ch), bias=False)
                self.add(f"{s}.{attn}.to_k", f"{d}.{attn}.to_k", (ch, kv), bias=False)
                self.add(f"{s}.{attn}.to_v", f"{d}.{attn}.to_v", (ch, kv), bias=False)
                self.add(f"{s}.{attn}.to_out.0", f"{d}.{attn}.to_out.0", (ch, ch))
            self.add(f"{s}.ff.net.0.proj", f"{d}.ff.net.0.proj", (ch * 8, ch))
            self.add(f"{s}.ff.net.2", f"{d}.ff.net.2", (ch, ch * 4))
            for n in ("norm1", "norm2", "norm3"):
                self.norm(f"{s}.{n}", f"{d}.{n}", ch)
        self.add(f"{sgm}.proj_out", f"{diffusers}.proj_out", (ch, ch))


def unet_table(cfg: UnetConfig) -> list[KeyMap]:
    """Every UNet tensor of an SDXL-topology model, in SGM file order of blocks."""
    b = _Builder()
    ch, temb, c0 = cfg.channels, cfg.time_embed_dim, cfg.model_channels
    n = len(ch)
    b.add("time_embed.0", "time_embedding.linear_1", (temb, c0))
    b.add("time_embed.2", "time_embedding.linear_2", (temb, temb))
    b.add("label_emb.0.0", "add_embedding.linear_1", (temb, cfg.adm_in_channels))
    b.add("label_emb.0.2", "add_embedding.linear_2", (temb, temb))
    b.add("input_blocks.0.0", "conv_in", (c0, cfg.in_channels, 3, 3))
    prev = c0
    for i in range(n):
        for j in range(cfg.layers_per_block):
            idx = i * (cfg.layers_per_block + 1) + j + 1
            b.resnet(f"input_blocks.{idx}.0", f"down_blocks.{i}.resnets.{j}", prev, ch[i], temb)
            prev = ch[i]
            if cfg.depths[i]:
                b.attention(f"input_blocks.{idx}.1", f"down_blocks.{i}.attentions.{j}", ch[i], cfg.depths[i], cfg.context_dim)
        if i < n - 1:
            idx = (i + 1) * (cfg.layers_per_block + 1)
            b.add(f"input_blocks.{idx}.0.op", f"down_blocks.{i}.downsamplers.0.conv", (ch[i], ch[i], 3, 3))
    top = ch[-1]
    b.resnet("middle_block.0", "mid_block.resnets.0", top, top, temb)
    b.attention("middle_block.1", "mid_block.attentions.0", top, cfg.mid_depth, cfg.context_dim)
    b.resnet("middle_block.2", "mid_block.resnets.1", top, top, temb)
    rev, rev_depths = list(reversed(ch)), list(reversed(cfg.depths))
    skip_stack = _skip_channels(cfg)
    prev = top
    for i in range(n):
        out = rev[i]
        for j in range(cfg.layers_per_block + 1):
            idx = i * (cfg.layers_per_block + 1) + j
            cin = prev + skip_stack.pop()
            b.resnet(f"output_blocks.{idx}.0", f"up_blocks.{i}.resnets.{j}", cin, out, temb)
            prev = out
            if rev_depths[i]:
                b.attention(f"output_blocks.{idx}.1", f"up_blocks.{i}.attentions.{j}", out, rev_depths[i], cfg.context_dim)
        if i < n - 1:
            idx = i * (cfg.layers_per_block + 1) + cfg.layers_per_block
            sub = 2 if rev_depths[i] else 1
            b.add(f"output_blocks.{idx}.{sub}.conv", f"up_blocks.{i}.upsamplers.0.conv", (out, out, 3, 3))
    b.norm("out.0", "conv_norm_out", c0)
    b.add("out.2", "conv_out", (cfg.out_channels, c0, 3, 3))
    return b.rows


def _skip_channels(cfg: UnetConfig) -> list[int]:
    """Channels pushed on the skip stack by the down path, in push order."""
    stack = [cfg.model_channels]
    for i, c in enumerate(cfg.channels):
        stack += [c] * cfg.layers_per_block
        if i < len(cfg.channels) - 1:
            stack.append(c)
    return stack


def unet_config_from_shapes(
    shapes: dict[str, tuple[int, ...]], prefix: str = "", *, pooled_dim: int | None = None
) -> UnetConfig:
    """Read the structure of an SDXL-topology UNet from its SGM tensor shapes.

    ``shapes`` maps SGM keys (with ``prefix``) to shapes. Raises ``KeyError`` when a key that
    every SDXL UNet has is missing.
    """
    def shape(key: str) -> tuple[int, ...]:
        return shapes[prefix + key]

    conv_in = shape("input_blocks.0.0.weight")
    c0 = conv_in[0]
    per = 3  # SDXL: layers_per_block 2 + one downsampler slot
    mult, depths = [], []
    level = 0
    while prefix + f"input_blocks.{level * per + 1}.0.in_layers.2.weight" in shapes:
        idx = level * per + 1
        mult.append(shape(f"input_blocks.{idx}.0.in_layers.2.weight")[0] // c0)
        depths.append(_count_blocks(shapes, f"{prefix}input_blocks.{idx}.1.transformer_blocks."))
        level += 1
    mid_depth = _count_blocks(shapes, f"{prefix}middle_block.1.transformer_blocks.")
    ctx = 0
    for key, s in shapes.items():
        if key.startswith(prefix) and key.endswith("attn2.to_k.weight"):
            ctx = s[1]
            break
    return UnetConfig(
        model_channels=c0,
        channel_mult=tuple(mult),
        depths=tuple(depths),
        mid_depth=mid_depth,
        in_channels=conv_in[1],
        out_channels=shape("out.2.weight")[0],
        context_dim=ctx,
        adm_in_channels=shape("label_emb.0.0.weight")[1],
        head_dim=64 if c0 >= 320 else 16,
        addition_time_embed_dim=_time_ids_dim(shape("label_emb.0.0.weight")[1], pooled_dim),
    )


def _time_ids_dim(adm: int, pooled_dim: int | None) -> int:
    """SDXL's ``adm`` input is the pooled text embedding plus 6 embedded size/crop numbers."""
    if pooled_dim is None:
        pooled_dim = 1280 if adm == 2816 else 0
    return max((adm - pooled_dim) // 6, 1)


def _count_blocks(shapes: dict[str, tuple[int, ...]], stem: str) -> int:
    idx = {int(k[len(stem):].split(".", 1)[0]) for k in shapes if k.startswith(stem)}
    return max(idx) + 1 if idx else 0
