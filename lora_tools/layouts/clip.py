"""SDXL text encoders: CLIP-L (Hugging Face layout on both sides) and OpenCLIP-bigG
(OpenCLIP layout in the single file, ``CLIPTextModelWithProjection`` in diffusers)."""

from __future__ import annotations

from dataclasses import dataclass

from lora_tools.layouts.table import Component, KeyMap


@dataclass(frozen=True, slots=True)
class ClipConfig:
    """Widths of a CLIP text transformer."""

    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    vocab: int = 49408
    positions: int = 77
    projection: int | None = None  # OpenCLIP-bigG: text_projection width
    act: str = "quick_gelu"

    def transformers_config(self) -> dict[str, object]:
        cfg: dict[str, object] = {
            "architectures": ["CLIPTextModelWithProjection" if self.projection else "CLIPTextModel"],
            "model_type": "clip_text_model",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": self.positions,
            "hidden_act": self.act,
            "layer_norm_eps": 1e-5,
            "bos_token_id": 0,
            "eos_token_id": 2,
            "pad_token_id": 1,
            "torch_dtype": "float32",
        }
        if self.projection:
            cfg["projection_dim"] = self.projection
        return cfg


CLIP_L = ClipConfig()
CLIP_BIGG = ClipConfig(hidden=1280, layers=32, heads=20, intermediate=5120, projection=1280, act="gelu")


def _linear(rows: list[KeyMap], comp: Component, sgm: str, hf: str, shape: tuple[int, ...]) -> None:
    rows.append(KeyMap(comp, f"{sgm}.weight", f"{hf}.weight", shape))
    rows.append(KeyMap(comp, f"{sgm}.bias", f"{hf}.bias", (shape[0],)))


def clip_l_table(cfg: ClipConfig = CLIP_L) -> list[KeyMap]:
    """CLIP-L: the single file keeps the Hugging Face names under its prefix."""
    rows: list[KeyMap] = []
    h, e = cfg.hidden, "text_model.embeddings"
    rows.append(KeyMap("te1", f"{e}.position_embedding.weight", f"{e}.position_embedding.weight", (cfg.positions, h)))
    rows.append(KeyMap("te1", f"{e}.position_ids", None, (1, cfg.positions), optional=True))
    rows.append(KeyMap("te1", f"{e}.token_embedding.weight", f"{e}.token_embedding.weight", (cfg.vocab, h)))
    for n in range(cfg.layers):
        p = f"text_model.encoder.layers.{n}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _linear(rows, "te1", f"{p}.self_attn.{proj}", f"{p}.self_attn.{proj}", (h, h))
        _linear(rows, "te1", f"{p}.layer_norm1", f"{p}.layer_norm1", (h,))
        _linear(rows, "te1", f"{p}.layer_norm2", f"{p}.layer_norm2", (h,))
        _linear(rows, "te1", f"{p}.mlp.fc1", f"{p}.mlp.fc1", (cfg.intermediate, h))
        _linear(rows, "te1", f"{p}.mlp.fc2", f"{p}.mlp.fc2", (h, cfg.intermediate))
    _linear(rows, "te1", "text_model.final_layer_norm", "text_model.final_layer_norm", (h,))
    return rows


def clip_g_table(cfg: ClipConfig = CLIP_BIGG) -> list[KeyMap]:
    """OpenCLIP-bigG: fused q/k/v, renamed blocks and a transposed ``text_projection``."""
    rows: list[KeyMap] = []
    h = cfg.hidden
    rows.append(KeyMap("te2", "positional_embedding", "text_model.embeddings.position_embedding.weight", (cfg.positions, h)))
    rows.append(KeyMap("te2", "token_embedding.weight", "text_model.embeddings.token_embedding.weight", (cfg.vocab, h)))
    for n in range(cfg.layers):
        s, d = f"transformer.resblocks.{n}", f"text_model.encoder.layers.{n}"
        for suffix, shape in (("weight", (3 * h, h)), ("bias", (3 * h,))):
            for i, qkv in enumerate(("q_proj", "k_proj", "v_proj")):
                rows.append(KeyMap("te2", f"{s}.attn.in_proj_{suffix}", f"{d}.self_attn.{qkv}.{suffix}", shape, "slice", (i, 3)))
        _linear(rows, "te2", f"{s}.attn.out_proj", f"{d}.self_attn.out_proj", (h, h))
        _linear(rows, "te2", f"{s}.ln_1", f"{d}.layer_norm1", (h,))
        _linear(rows, "te2", f"{s}.ln_2", f"{d}.layer_norm2", (h,))
        _linear(rows, "te2", f"{s}.mlp.c_fc", f"{d}.mlp.fc1", (cfg.intermediate, h))
        _linear(rows, "te2", f"{s}.mlp.c_proj", f"{d}.mlp.fc2", (h, cfg.intermediate))
    _linear(rows, "te2", "ln_final", "text_model.final_layer_norm", (h,))
    proj = cfg.projection or h
    rows.append(KeyMap("te2", "text_projection", "text_projection.weight", (h, proj), "transpose"))
    rows.append(KeyMap("te2", "logit_scale", None, (), optional=True))
    return rows


def clip_config_from_shapes(shapes: dict[str, tuple[int, ...]], prefix: str, *, open_clip: bool) -> ClipConfig:
    """Read CLIP widths from single-file tensor shapes."""
    if open_clip:
        tok = shapes[prefix + "token_embedding.weight"]
        stem = prefix + "transformer.resblocks."
        fc = shapes[stem + "0.mlp.c_fc.weight"]
        proj = shapes.get(prefix + "text_projection", (tok[1], tok[1]))[1]
        pos = shapes[prefix + "positional_embedding"][0]
        act = "gelu"
    else:
        tok = shapes[prefix + "text_model.embeddings.token_embedding.weight"]
        stem = prefix + "text_model.encoder.layers."
        fc = shapes[stem + "0.mlp.fc1.weight"]
        proj = None
        pos = shapes[prefix + "text_model.embeddings.position_embedding.weight"][0]
        act = "quick_gelu"
    layers = 1 + max(int(k[len(stem):].split(".", 1)[0]) for k in shapes if k.startswith(stem))
    hidden = tok[1]
    heads = hidden // 64 if hidden >= 64 else 2
    return ClipConfig(hidden=hidden, layers=layers, heads=heads, intermediate=fc[0], vocab=tok[0],
                      positions=pos, projection=proj, act=act)
