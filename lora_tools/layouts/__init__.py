"""Model key layouts: SDXL single file (SGM) <-> diffusers, built from block structure; the one
component table and the one block scheme."""

from lora_tools.layouts.blocks import BLOCKS, BlockSpecError, BlockWeights, block_of, parse_block_weights
from lora_tools.layouts.components import COMPONENTS, ComponentSpec
from lora_tools.layouts.sdxl import FULL, SIZES, TINY, LayoutTable, SDXLConfig, config_from_shapes
from lora_tools.layouts.table import DIFFUSERS_FOLDERS, SGM_PREFIXES, Component, KeyMap

__all__ = ["FULL", "TINY", "SIZES", "SDXLConfig", "LayoutTable", "KeyMap", "Component", "SGM_PREFIXES",
           "DIFFUSERS_FOLDERS", "config_from_shapes", "BLOCKS", "BlockSpecError", "BlockWeights", "block_of",
           "parse_block_weights", "COMPONENTS", "ComponentSpec"]
