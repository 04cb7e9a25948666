"""``verify``: sample a model with the settings it needs, and prove a fused file faithful.

Plan first (:func:`plan_verify`: every check on the arguments and the files, nothing loaded or
written), then run (:func:`run_verify`); :func:`verify_model` does both. The CLI and a recipe's
verify job call these.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_tools.errors import Hint, MemoryNeedError, UsageError
from lora_tools.presets import (
    PRESETS,
    AccelerationPreset,
    SamplerSettings,
    get_preset,
    identify_file,
    sampler_from_record,
)
from lora_tools.provenance import read_record
from lora_tools.verify.cost import (
    MemoryPrediction,
    UnetScale,
    available_memory,
    headers_of,
    model_params,
    predicted_cpu_seconds,
    predicted_memory,
    unet_scale,
)
from lora_tools.verify.report import ImageResult, VerifyReport

__all__ = ["DEFAULT_PROMPTS", "WRONG_COLUMN", "WRONG_SETTINGS", "VerifyPlan", "VerifyReport", "plan_verify", "run_verify", "verify_model"]

DEFAULT_PROMPTS: tuple[str, ...] = ("a cat", "a lighthouse at dusk")

#: The label of the "wrong settings" column in the grid.
WRONG_COLUMN = "wrong settings"

#: The "wrong settings" column of ``show_wrong``: what users try first (leading spacing, CFG 7, 30 steps).
WRONG_SETTINGS = SamplerSettings(scheduler="EulerDiscreteScheduler", timestep_spacing="leading", steps=30,
                                 guidance_scale=7.0, prediction_type="epsilon", comfy_sampler="euler",
                                 comfy_scheduler="normal", comfy_cfg=7.0)


@dataclass(frozen=True)
class VerifyPlan:
    """Everything :func:`run_verify` will do, checked.

    Attributes:
        model: the model path; ``kind`` ``"checkpoint"``, ``"unet"`` or ``"diffusers"``.
        preset: the preset name, if the settings come from one.
        sampler: the settings to sample with.
        prompts, seeds, size: what to render (``size`` is ``(width, height)``).
        against, loras: the base and the runtime LoRAs (path, strength) of a faithfulness check.
        device, dtype: where and how the pipelines run.
        out: the output folder, or ``None`` (nothing written).
    """

    model: Path
    kind: str
    preset: str | None
    sampler: SamplerSettings
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    size: tuple[int, int]
    base: Path | None
    config: Path | None
    against: Path | None
    loras: tuple[tuple[Path, float], ...]
    device: str
    dtype: str
    compile: bool
    show_wrong: bool
    workflow: bool
    out: Path | None
    metadata: dict[str, str]
    unet: UnetScale | None = None
    memory: MemoryPrediction | None = None

    @property
    def renders(self) -> int:
        """Images rendered: prompts x seeds, twice with ``against``, plus the wrong-settings column."""
        n = len(self.prompts) * len(self.seeds) * (2 if self.against is not None else 1)
        return n + (len(self.prompts) if self.show_wrong else 0)

    @property
    def unet_steps(self) -> int:
        """UNet evaluations of the run (CFG doubles each step)."""
        main = len(self.prompts) * len(self.seeds) * (2 if self.against is not None else 1)
        per = self.sampler.steps * (2 if self.sampler.guidance_scale > 1 else 1)
        wrong = len(self.prompts) * WRONG_SETTINGS.steps * 2 if self.show_wrong else 0
        return main * per + wrong

    def predicted_cpu_seconds(self) -> float | None:
        """About how long the renders take on a CPU in fp32 (``None`` when the UNet's size is unknown)."""
        return None if self.unet is None else predicted_cpu_seconds(self.unet, self.size, self.unet_steps, self.renders)


def plan_verify(model: str | Path, *, preset: str = "auto", prompts: Sequence[str] = DEFAULT_PROMPTS,
                seeds: Sequence[int] = (0,), size: tuple[int, int] | None = None, steps: int | None = None,
                force: bool = False, base: str | Path | None = None, config: str | Path | None = None,
                against: str | Path | None = None, loras: Sequence[tuple[str | Path, float]] = (),
                device: str = "auto", dtype: str = "auto", compile: bool = False, show_wrong: bool = False,
                workflow: bool = False, out: str | Path | None = None, overwrite: bool = False) -> VerifyPlan:
    """Check the arguments and the files of a verify run, load nothing.

    Args:
        model: fused single-file checkpoint, standalone UNet (with ``base``) or diffusers folder.
        preset: ``"auto"`` (the settings fuse recorded in the file, else the file's identity) or a name.
        size: ``(width, height)``; ``None``: the model's native size (1024x1024 for an SDXL-sized UNet, 64x64
            for a test-sized one, decided from the UNet's width).
        steps: another step count; refused when it contradicts the model unless ``force``.
        against, loras: render BASE with ``loras`` applied at run time and compare with ``model``.
        out: folder for the grid, the images, ``report.json`` and ``report.md``.

    Raises:
        [`UsageError`]: no settings to be found, contradicting steps or preset, bad sizes or devices.
        [`OutputExistsError`]: ``out`` holds an earlier report and ``overwrite`` is not set.
    """
    from lora_tools.io.safetensors import read_header
    from lora_tools.verify.pipeline import model_kind
    from lora_tools.verify.sampler import pick_device

    path = Path(model)
    kind = model_kind(path)
    meta_file = path / "unet" / "diffusion_pytorch_model.safetensors" if kind == "diffusers" else path
    header = read_header(meta_file) if meta_file.is_file() and meta_file.suffix != ".bin" else None
    metadata = dict(header.metadata) if header is not None else {}
    unet = unet_scale(header) if header is not None else None
    if size is None:
        size = unet.native_size if unet is not None else (1024, 1024)
    record = read_record(metadata)
    recorded = sampler_from_record(record)
    recorded_name = _recorded_preset(record)
    chosen: AccelerationPreset | None = None
    name: str | None
    if preset == "auto":
        if recorded is None:
            chosen = identify_file(str(path))
            if chosen is None:
                raise UsageError(f"{path}: no sampler settings recorded in the file and its name is no known preset",
                                 hint=Hint("preset", "with a preset name (see loratool presets)", "NAME"))
            sampler, name = chosen.sampler, chosen.name
        else:
            sampler, name = recorded, recorded_name
    else:
        chosen = get_preset(preset)
        sampler, name = chosen.sampler, chosen.name
        if recorded_name is not None and recorded_name != chosen.name and not force:
            raise UsageError(f"{path} was fused with {recorded_name}, not {chosen.name}",
                             hint=Hint("force", "to sample it with another preset"))
    if steps is not None and steps != sampler.steps:
        allowed = sampler.steps_range is not None and sampler.steps_range[0] <= steps <= sampler.steps_range[1]
        if not allowed and not force:
            raise UsageError(f"{path} is a {sampler.steps}-step model ({name or 'recorded settings'}): "
                             f"{steps} steps contradict it", hint=Hint("force", "to sample with them anyway"))
        if steps < 1:
            raise UsageError(f"steps must be positive, got {steps}.", hint=Hint("steps", "", "N"))
        sampler = dataclasses.replace(sampler, steps=steps, timesteps=None)
    if not seeds:
        raise UsageError("no seeds to render.", hint=Hint("seeds", "", "0,1,2"))
    width, height = size
    if width % 8 or height % 8 or width < 8 or height < 8:
        raise UsageError(f"size {width}x{height}: width and height must be positive multiples of 8.",
                         hint=Hint("size", "", "WxH"))
    if not prompts:
        raise UsageError("no prompts to render.", hint=Hint("prompt", "", "TEXT"))
    if against is None and loras:
        raise UsageError("runtime LoRAs need the base they apply to", hint=Hint("against", "with the base", "BASE"))
    if against is not None and not loras and _fp8_form(path) is None:  # an fp8 model is checked against its fp16 one
        raise UsageError("a faithfulness check needs the LoRAs the model was fused with",
                         hint=Hint("lora", "for each of them", "SRC[:STRENGTH]"))
    for p in [x for x in (base, config, against) if x is not None] + [p for p, _ in loras]:
        if not Path(p).exists():
            raise UsageError(f"'{p}' does not exist.")
    run_device = pick_device(device)
    run_dtype = dtype if dtype != "auto" else ("fp16" if run_device == "cuda" else "fp32")
    if run_dtype not in ("fp32", "fp16", "bf16"):
        raise UsageError(f"Unknown dtype '{dtype}': choose auto, fp16, bf16 or fp32.", hint=Hint("dtype", "", "DTYPE"))
    memory = _predicted_memory(path, kind, base, against, [Path(p) for p, _ in loras], run_dtype, (width, height),
                               sampler, show_wrong)
    if run_device == "cpu":
        _refuse_if_too_big(path, memory, run_dtype, (width, height))
    out_dir = Path(out) if out is not None else None
    if out_dir is None and (show_wrong or workflow):
        raise UsageError("the wrong-settings column and the workflow are written into the output folder",
                         hint=Hint("out", "", "DIR"))
    if out_dir is not None:
        from lora_tools.verify.out_folder import check_out_folder

        inputs = [p for p in (path, base, config, against) if p is not None] + [p for p, _ in loras]
        check_out_folder(out_dir, overwrite=overwrite, inputs=inputs)
    return VerifyPlan(path, kind, name, sampler, tuple(prompts), tuple(int(s) for s in seeds), (width, height),
                      Path(base) if base else None, Path(config) if config else None,
                      Path(against) if against else None, tuple((Path(p), float(s)) for p, s in loras),
                      run_device, run_dtype, compile, show_wrong, workflow, out_dir, metadata, unet, memory)


def _predicted_memory(path: Path, kind: str, base: str | Path | None, against: str | Path | None, loras: list[Path],
                      dtype: str, size: tuple[int, int], sampler: SamplerSettings, show_wrong: bool) -> MemoryPrediction:
    """The run's peak memory: the model's, or the reference's when it is bigger (they run one after the other); the
    reference holds its runtime LoRAs beside its models too (as read, and as layers in the run's dtype)."""
    guided = sampler.guidance_scale > 1 or show_wrong
    model = predicted_memory(model_params(headers_of(path, kind, Path(base) if base is not None else None)), dtype,
                             size, guided)
    if against is None:
        return model
    ref_path = Path(against)
    ref = predicted_memory(model_params(headers_of(ref_path, "diffusers" if ref_path.is_dir() else "checkpoint")),
                           dtype, size, guided)
    lora_bytes = sum(p.stat().st_size for p in loras if p.is_file())
    ref = dataclasses.replace(ref, peak=ref.peak + lora_bytes * 3)
    return max(model, ref, key=lambda m: m.peak)


def _refuse_if_too_big(path: Path, memory: MemoryPrediction, dtype: str, size: tuple[int, int]) -> None:
    """One line when the predicted peak is above the available memory, naming what to change: the size when the
    activations are most of it, else a half-precision dtype, else the device."""
    from lora_tools.units import format_bytes

    available = available_memory()
    if available is None or memory.peak <= available:
        return
    if memory.activations > memory.weights:
        hint = Hint("size", "for a smaller image", "WxH")
    elif dtype == "fp32":
        hint = Hint("dtype", "to halve the weights", "bf16")
    else:
        hint = Hint("device", "to run on a GPU", "cuda")
    raise MemoryNeedError(f"{path}: verify needs about {format_bytes(memory.peak)} ({memory.stage} in {dtype} at "
                          f"{size[0]}x{size[1]}), {format_bytes(available)} of memory is available", hint=hint)


def _step(progress: Callable[[str, int, int], None] | None, what: str) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    return lambda done, total: progress(what, done, total)


def _recorded_preset(record: dict[str, Any] | None) -> str | None:
    if not record:
        return None
    name = record.get("preset")
    if isinstance(name, str) and name.lower() in PRESETS:
        return name.lower()
    steps = record.get("lightning_steps")
    return f"lightning-{steps}step" if isinstance(steps, int) and f"lightning-{steps}step" in PRESETS else None



def compile_unet(unet: Any, device: str) -> Any:
    """``torch.compile`` of the UNet: ``max-autotune`` (CUDA graphs, autotuned GEMMs) with channels-last
    on CUDA, where it pays; the default mode elsewhere (CPU compiles take minutes and gain little)."""
    import torch

    if device == "cuda":
        unet.to(memory_format=torch.channels_last)
        return torch.compile(unet, mode="max-autotune")
    return torch.compile(unet)


def run_verify(plan: VerifyPlan, progress: Callable[[str, int, int], None] | None = None) -> VerifyReport:
    """Render the plan's prompts x seeds, compare with the reference if any, write the outputs.
    ``progress(what, step, steps)`` is called after each UNet step (``what`` names the render).

    One model is in memory at a time (:func:`lora_tools.verify.render.render_staged`): the text encoders, then the
    UNet, then the VAE, of the model, then of the reference. A NaN in latents or images is a failed check
    (``report.failures`` says where), not an exception.
    """
    from lora_tools.heap import frozen_heap

    with frozen_heap():  # each model dropped is collected before the next loads (ten collections a run)
        return _run_verify(plan, progress)


def _run_verify(plan: VerifyPlan, progress: Callable[[str, int, int], None] | None) -> VerifyReport:
    import torch

    from lora_tools.io.hashing import header_sha256, sha256_file
    from lora_tools.verify.oracle import FP8_PSNR_THRESHOLD_DB, PSNR_THRESHOLDS_DB, psnr_db, runtime_lora_loader
    from lora_tools.verify.pipeline import open_parts
    from lora_tools.verify.render import Job, render_staged

    if plan.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cells = [(r, c) for r in range(len(plan.prompts)) for c in range(len(plan.seeds))]
    jobs = [Job(plan.prompts[r], plan.seeds[c], plan.sampler, str(plan.model),
                _step(progress, f"model, prompt {r + 1}/{len(plan.prompts)}, seed {plan.seeds[c]}")) for r, c in cells]
    if plan.show_wrong:  # wrong settings may well break a model: shown, not a failed check
        jobs += [Job(prompt, plan.seeds[0], WRONG_SETTINGS, "wrong settings") for prompt in plan.prompts]
    parts = open_parts(plan.model, base=plan.base, config=plan.config, dtype=plan.dtype, device=plan.device)
    try:
        run = render_staged(parts, jobs, plan.size,
                            (lambda unet: compile_unet(unet, plan.device)) if plan.compile else None)
    finally:
        parts.close()
    main, wrong = run.results[:len(cells)], run.results[len(cells):]
    failures: list[str] = []
    images: list[ImageResult] = []
    rendered: dict[tuple[int, int], tuple[Any, Any]] = {}
    references: dict[tuple[int, int], Any] = {}  # the base + runtime LoRAs' images, for the comparison picture
    for (r, c), result in zip(cells, main, strict=True):
        one = result.rendered
        if one is None:
            failures.append(str(result.error))
            continue
        rendered[r, c] = one.latents, one.image
        images.append(ImageResult(plan.prompts[r], plan.seeds[c], one.seconds, one.step_seconds,
                                  decode_seconds=one.decode_seconds))
    scheduler = main[0].scheduler
    timesteps = [int(t) for t in scheduler.timesteps.tolist()]
    settings = {"scheduler": type(scheduler).__name__, "options": plan.sampler.scheduler_options()
                | ({"timesteps": list(plan.sampler.timesteps)} if plan.sampler.timesteps else {})
                | ({"eta": plan.sampler.eta} if plan.sampler.eta is not None else {}),
                "timesteps": timesteps, "steps": len(timesteps), "guidance_scale": plan.sampler.guidance_scale,
                "prediction_type": scheduler.config.prediction_type}
    verdict = threshold = against = None
    if plan.against is not None:
        ref = open_parts(plan.against, config=plan.config, dtype=plan.dtype, device=plan.device)
        ref.on_load = runtime_lora_loader(plan.loras, ref.components.config("unet"))
        limit = PSNR_THRESHOLDS_DB[plan.dtype]
        threshold = {"psnr_db": limit, "on": "final latents", "dtype": plan.dtype}
        fp8 = _fp8_form(plan.model)
        if fp8 is not None:  # fp8 weights: the rounding is a real change, judged by its own threshold
            limit = min(limit, FP8_PSNR_THRESHOLD_DB)
            threshold |= {"psnr_db": limit, "weights": f"fp8 {fp8}"}
        against = {"base": str(plan.against), "loras": [{"path": str(p), "strength": s} for p, s in plan.loras]}
        pairs = list(rendered)
        ref_jobs = [Job(plan.prompts[r], plan.seeds[c], plan.sampler, f"{plan.against} + runtime LoRAs",
                        _step(progress, f"base + LoRAs, prompt {r + 1}/{len(plan.prompts)}, seed {plan.seeds[c]}"))
                    for r, c in pairs]
        try:
            ref_run = render_staged(ref, ref_jobs, plan.size) if ref_jobs else None
        finally:
            ref.close()
        worst = math.inf
        for (r, c), ref_result in zip(pairs, ref_run.results if ref_run is not None else [], strict=True):
            if ref_result.rendered is None:
                failures.append(str(ref_result.error))
                continue
            lat, img = rendered[r, c]
            rlat, rimg = ref_result.rendered.latents, ref_result.rendered.image
            references[r, c] = rimg
            shown = next(i for i in images if i.prompt == plan.prompts[r] and i.seed == plan.seeds[c])
            shown.psnr_db = psnr_db(lat, rlat)
            shown.image_psnr_db = psnr_db(img, rimg)
            shown.max_abs = float((lat - rlat).abs().max())
            worst = min(worst, shown.psnr_db if not math.isnan(shown.psnr_db) else -math.inf)
        verdict = "pass" if not failures and worst >= limit else "fail"
    model_id: dict[str, Any] = {"path": str(plan.model), "kind": plan.kind}
    if plan.model.is_file():
        model_id["sha256"] = sha256_file(plan.model)
    else:  # a diffusers folder: its weight files' headers (names, shapes, offsets, metadata) identify it cheaply
        model_id["header_sha256"] = header_sha256(sorted(plan.model.rglob("*.safetensors")))
    report = VerifyReport(model_id, plan.preset, settings, plan.device, plan.dtype, images, failures, verdict,
                          threshold, against, run.compile_seconds,
                          int(torch.cuda.max_memory_allocated()) if plan.device == "cuda" else None)
    if plan.show_wrong:
        report.wrong_settings = {"non_finite": [str(w.error) for w in wrong if w.error is not None],
                                 "scheduler": type(wrong[0].scheduler).__name__,
                                 "timestep_spacing": WRONG_SETTINGS.timestep_spacing, "steps": WRONG_SETTINGS.steps,
                                 "guidance_scale": WRONG_SETTINGS.guidance_scale,
                                 "timesteps": [int(t) for t in wrong[0].scheduler.timesteps.tolist()],
                                 "seed": plan.seeds[0]}
    if plan.out is not None:
        from lora_tools.verify.out_folder import written_whole

        wrong_images = [w.rendered.image if w.rendered is not None else None for w in wrong]
        with written_whole(plan.out) as dest:
            _write_outputs(plan, report, rendered, wrong_images, dest, references)
    return report


def _to_pil(img: Any) -> Any:
    from PIL import Image

    arr = ((img[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


def grid_title(plan: VerifyPlan, report: VerifyReport) -> str:
    """The pictures' title: model, preset, sampler settings and, with a reference, the verdict and worst PSNR."""
    s = report.settings
    parts = [plan.model.name, plan.preset or "recorded settings",
             f"{s['scheduler']} {plan.sampler.timestep_spacing}, {s['steps']} steps, CFG {s['guidance_scale']:g}"]
    if report.verdict is not None:
        worst = min((i.psnr_db for i in report.images if i.psnr_db is not None), default=float("nan"))
        threshold = f" (threshold {report.threshold['psnr_db']:g} dB)" if report.threshold else ""
        parts.append(f"{report.verdict.upper()}: PSNR {worst:.1f} dB{threshold} vs {_reference_label(plan)}")
    return " | ".join(p for p in parts if p)


def _reference_label(plan: VerifyPlan) -> str:
    """What the model is compared with: the base with its runtime LoRAs, or the file itself (an fp8 model's
    fp16 counterpart)."""
    assert plan.against is not None
    return "base + LoRAs" if plan.loras else plan.against.name


def _write_outputs(plan: VerifyPlan, report: VerifyReport, rendered: dict[tuple[int, int], tuple[Any, Any]],
                   wrong: list[Any], dest: Path, references: dict[tuple[int, int], Any] | None = None) -> None:
    """Write the images, grid, workflow and reports into ``dest`` (the temp folder that becomes ``plan.out``);
    the report names each file where it will be, under ``plan.out``. ``wrong``: the wrong-settings column's
    images (``None`` where one broke)."""
    from PIL import Image

    from lora_tools.verify.grid import make_grid
    from lora_tools.verify.workflow import comfy_workflow

    assert plan.out is not None
    out, final = dest, plan.out

    def shown(p: Path) -> str:
        return str(final / p.relative_to(out))

    (out / "images").mkdir(parents=True, exist_ok=True)
    blank = Image.new("RGB", plan.size, "black")
    rows: list[list[Any]] = []
    for r, prompt in enumerate(plan.prompts):
        row = []
        for c, seed in enumerate(plan.seeds):
            im = _to_pil(rendered[r, c][1]) if (r, c) in rendered else blank
            name = out / "images" / f"p{r}-seed{seed}.png"
            im.save(name)
            report.files.append(shown(name))
            for result in report.images:
                if result.prompt == prompt and result.seed == seed:
                    result.file = shown(name)
            row.append(im)
        rows.append(row)
    columns: list[Any] = list(plan.seeds)
    if plan.show_wrong:
        for r, image in enumerate(wrong):
            rows[r].append(_to_pil(image) if image is not None else blank)
        columns.append(WRONG_COLUMN)
    title = grid_title(plan, report)
    report.files.append(shown(Path(make_grid(rows, plan.prompts, columns, out / "grid.png", title=title))))
    pairs = sorted(k for k in (references or {}) if k in rendered)
    if pairs:
        from lora_tools.verify.grid import make_comparison

        assert references is not None
        labels = [f"{plan.prompts[r]} (seed {plan.seeds[c]})" for r, c in pairs]
        comparison = make_comparison([_to_pil(rendered[k][1]) for k in pairs], [_to_pil(references[k]) for k in pairs],
                                     labels, out / "comparison.png", title=title,
                                     reference_label="base + LoRAs" if plan.loras else "ref. file")
        report.files.append(shown(Path(comparison)))
    if plan.workflow:
        wf = comfy_workflow(plan.model.name, plan.sampler, prompt=plan.prompts[0], seed=plan.seeds[0],
                            width=plan.size[0], height=plan.size[1])
        path = out / "workflow.json"
        path.write_text(json.dumps(wf, indent=2) + "\n")
        report.files.append(shown(path))
    report.files += [shown(out / "report.json"), shown(out / "report.md")]
    report.write_json(out / "report.json")
    (out / "report.md").write_text(report.markdown())


def verify_model(model: str | Path, **options: Any) -> VerifyReport:
    """:func:`plan_verify` then :func:`run_verify` (keyword options as in :func:`plan_verify`)."""
    return run_verify(plan_verify(model, **options))


def _fp8_form(model: Path) -> str | None:
    """``scaled``/``plain`` when ``model`` is a single file with fp8 weights (lora_tools.io.fp8), else None."""
    from lora_tools.io.fp8 import layout_of
    from lora_tools.io.safetensors import read_header

    if not model.is_file() or model.suffix != ".safetensors":
        return None
    layout = layout_of({k: t.dtype for k, t in read_header(model).tensors.items()})
    return layout.form if layout is not None else None
