"""The four models of an SDXL pipeline, each built and loaded on its own, when it is needed.

A model is built empty (its parameters on torch's ``meta`` device: no memory, no random init), then filled one
tensor at a time as the reader gives them (:meth:`lora_tools.io.model.ModelSource.component_tensors`: single-file
keys converted to diffusers keys on the way), each cast to the run's dtype and device as it comes. No state dict
of the model is ever held beside it, so loading costs the model's own size plus one tensor; and a model that is
not needed (the text encoders while the UNet samples, the UNet while the VAE decodes) is not in memory at all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from lora_tools.errors import Hint, InvalidFileError, UsageError
from lora_tools.layouts.components import Component
from lora_tools.verify.sampler import quiet_diffusers

if TYPE_CHECKING:
    import torch

    from lora_tools.io.model import ModelSource

    #: Where one component's weights come from (see :class:`Components`).
    Weights: TypeAlias = ModelSource | Path | Callable[[], Iterable[tuple[str, torch.Tensor]]]

__all__ = ["PIPELINE_PARTS", "Components", "empty_model", "fill_model"]

#: The pipeline attribute of each component, in the order a render uses them.
PIPELINE_PARTS: dict[str, Component] = {"text_encoder": "te1", "text_encoder_2": "te2", "unet": "unet", "vae": "vae"}


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside goes to the ``meta`` device (its initialisation then costs nothing);
    buffers stay real (CLIP's ``position_ids`` are computed, not stored in files)."""
    import torch

    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign]


def empty_model(build: Callable[[], Any]) -> Any:
    """``build()`` with its parameters on the ``meta`` device: the model's structure and config, no weights."""
    with _parameters_on_meta(), quiet_diffusers():
        return build()


def fill_model(model: Any, tensors: Iterable[tuple[str, torch.Tensor]], *, dtype: Any, device: str, what: str) -> Any:
    """Put each ``(diffusers key, tensor)`` into ``model`` as it comes, cast to ``dtype`` on ``device`` (through
    fp32, as a model loaded in fp32 then cast would hold it); keys the model has no parameter or stored buffer for
    are ignored. Returns the model in eval mode.

    Raises:
        [`InvalidFileError`]: a parameter of the model got no tensor, or one of another shape; names ``what``.
    """
    import torch

    for key, tensor in tensors:
        path, _, name = key.rpartition(".")
        module = _submodule(model, path)
        if module is None:
            path = path.removeprefix("text_model.")  # transformers >= 5 keeps CLIP-L without the prefix
            module = _submodule(model, path)
        if module is None:
            continue
        if name in module._parameters:
            old = module._parameters[name]
            if old is not None and tuple(old.shape) != tuple(tensor.shape):
                raise InvalidFileError(f"{what}: {key} has shape {tuple(tensor.shape)}, the model "
                                       f"{tuple(old.shape)}.")
            value = tensor.to(torch.float32).to(device=device, dtype=dtype)
            module._parameters[name] = torch.nn.Parameter(value, requires_grad=old.requires_grad if old is not None
                                                          else False)
        elif name in module._buffers and name not in module._non_persistent_buffers_set:
            module._buffers[name] = tensor.to(torch.float32).to(device=device, dtype=dtype)
    missing = [k for k, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise InvalidFileError(f"converted {what} weights lack {len(missing)} tensors (first: {missing[0]}).")
    with quiet_diffusers():
        return model.to(device).eval()


def _submodule(model: Any, path: str) -> Any:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


class Components:
    """Where each model of a pipeline comes from: an empty model of its config (:meth:`empty`) and the model
    loaded with its weights (:meth:`load`), one component at a time.

    Args:
        configs: the folder with each component's ``config.json`` (a diffusers folder, or the skeleton written for
            a single file), read at once: the folder may go away after.
        weights: each component's source: a :class:`~lora_tools.io.model.ModelSource` read one tensor at a time,
            a diffusers folder whose component sub-folder ``from_pretrained`` loads, or a function giving the
            ``(diffusers key, tensor)`` pairs (a pickled UNet).
        dtype, device: the run's torch dtype and device.
    """

    def __init__(self, configs: Path, weights: dict[Component, Weights], *, dtype: Any, device: str):
        from lora_tools.layouts.table import DIFFUSERS_FOLDERS

        with quiet_diffusers():
            from diffusers import AutoencoderKL, UNet2DConditionModel
            from transformers import CLIPTextConfig

            self._configs: dict[Component, Any] = {
                "unet": UNet2DConditionModel.load_config(configs / DIFFUSERS_FOLDERS["unet"]),
                "vae": AutoencoderKL.load_config(configs / DIFFUSERS_FOLDERS["vae"]),
                "te1": CLIPTextConfig.from_pretrained(configs / DIFFUSERS_FOLDERS["te1"]),
                "te2": CLIPTextConfig.from_pretrained(configs / DIFFUSERS_FOLDERS["te2"]),
            }
        self.weights = weights
        self.dtype = dtype
        self.device = device

    def config(self, component: Component) -> Any:
        """The component's config as its model holds it (a ``FrozenDict`` for diffusers models, read by attribute)."""
        from diffusers.configuration_utils import FrozenDict

        config = self._configs[component]
        return FrozenDict(config) if isinstance(config, dict) else config

    def empty(self, component: Component) -> Any:
        """The component's model with no weights (parameters on ``meta``): its config and structure."""
        with quiet_diffusers():
            from diffusers import AutoencoderKL, UNet2DConditionModel
            from transformers import CLIPTextModel, CLIPTextModelWithProjection

        config = self._configs[component]
        builders: dict[Component, Callable[[], Any]] = {
            "unet": lambda: UNet2DConditionModel.from_config(config),
            "vae": lambda: AutoencoderKL.from_config(config),
            "te1": lambda: CLIPTextModel(config),
            "te2": lambda: CLIPTextModelWithProjection(config),
        }
        return empty_model(builders[component])

    def load(self, component: Component, dtype: Any = None) -> Any:
        """The component's model with its weights, in ``dtype`` (the run's by default), on the run's device."""
        from lora_tools.io.model import ModelSource

        dtype = dtype if dtype is not None else self.dtype
        source = self.weights[component]
        if isinstance(source, Path):
            return _from_folder(source, component, dtype, self.device)
        tensors = source.component_tensors(component) if isinstance(source, ModelSource) else source()
        return fill_model(self.empty(component), tensors, dtype=dtype, device=self.device, what=component)

    def close(self) -> None:
        """Close the files the weights are read from."""
        from lora_tools.io.model import ModelSource

        for source in self.weights.values():
            if isinstance(source, ModelSource):
                source.close()


def _from_folder(folder: Path, component: Component, dtype: Any, device: str) -> Any:
    """One component of a diffusers folder, loaded by its own class's ``from_pretrained``."""
    from lora_tools.layouts.table import DIFFUSERS_FOLDERS

    with quiet_diffusers():
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        classes: dict[Component, Any] = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "te1": CLIPTextModel,
                                         "te2": CLIPTextModelWithProjection}
        sub = DIFFUSERS_FOLDERS[component]
        if not (folder / sub).is_dir():
            raise UsageError(f"{folder}: no {sub}/ folder", hint=Hint("base", "with a full SDXL model", "PATH"))
        model = classes[component].from_pretrained(folder, subfolder=sub, dtype=dtype, local_files_only=True)
        return model.to(device).eval()
