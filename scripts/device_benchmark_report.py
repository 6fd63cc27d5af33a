"""Markdown tables of ``scripts/device_benchmark.py``'s results (one table per section, in the JSON's order)."""

from __future__ import annotations

from typing import Any, Callable


def _fmt(spec: str) -> Callable[[Any], str]:
    return lambda v: "-" if v is None else spec.format(v)


def _shape(v) -> str:
    return "x".join(map(str, v))


NUM0, NUM1, NUM2, NUM3, PCT = _fmt("{:.0f}"), _fmt("{:.1f}"), _fmt("{:.2f}"), _fmt("{:.3f}"), _fmt("{:.1%}")
PEAK = ("peak memory (MiB)", "peak_mib", NUM0)
MFU = [("MFU (datasheet)", "mfu_datasheet", PCT), ("MFU (measured matmul)", "mfu_measured_matmul", PCT)]
LEVER_COLUMNS = [
    ("variant", "lever", str),
    ("batch", "batch", str),
    ("images/s", "images_per_s", NUM1),
    ("s/step", "sec_per_step", NUM3),
    ("speed-up vs current path", "speedup_vs_current", NUM2),
    ("vs previous row", "speedup_vs_previous", NUM2),
    MFU[0],
    PEAK,
]

# section -> (title, columns (header, key, format)); titles may use the results' top-level keys
TABLES: dict[str, tuple[str, list]] = {
    "stage2_training": (
        "Stage-2 training step (encode + UNet fwd/bwd + AdamW, bf16 autocast)",
        [
            ("batch", "batch", str),
            ("UNet", "unet", str),
            ("params (M)", "unet_params_m", NUM1),
            ("latents", "latent", _shape),
            ("images/s", "images_per_s", NUM1),
            ("s/step", "sec_per_step", NUM3),
            ("ratio to MONAI", "ratio_to_monai", NUM2),
            ("UNet GFLOP/step", "unet_gflops_per_step", NUM0),
            ("TFLOP/s", "tflops_per_s", NUM1),
            *MFU,
            PEAK,
        ],
    ),
    "speed_levers": ("Speed levers (cumulative, MONAI UNet)", LEVER_COLUMNS),
    "torch_compile": (
        "torch.compile (all levers above, eager against compiled; compiling took {compile_s:.0f} s; the speed-up "
        "against the current path is scaled through the eager row when the levers ran in the same command)",
        LEVER_COLUMNS,
    ),
    "batch_scaling": (
        "Batch size (all eager levers: cached latents, fused AdamW, SDPA, channels_last)",
        [
            ("batch", "batch", str),
            ("images/s", "images_per_s", NUM1),
            ("s/step", "sec_per_step", NUM3),
            ("TFLOP/s", "tflops_per_s", NUM1),
            *MFU,
            PEAK,
        ],
    ),
    "stage1_training": (
        "Stage-1 training (SupervisedTrainer + AutoencoderKLIteration, bf16 autocast)",
        [
            ("adversarial step", "adversarial", lambda v: "yes" if v else "no"),
            ("batch", "batch", str),
            ("images/s", "images_per_s", NUM1),
            ("s/step", "sec_per_step", NUM3),
            PEAK,
        ],
    ),
    "stage1_levers": (
        "Stage-1 memory levers (adversarial step on)",
        [
            ("variant", "variant", str),
            ("batch", "batch", str),
            ("images/s", "images_per_s", NUM1),
            ("s/step", "sec_per_step", NUM3),
            PEAK,
        ],
    ),
    "sampling": (
        "Sampling (DDIM, batched guidance 3.0, bf16 autocast)",
        [
            ("DDIM steps", "ddim_steps", str),
            ("batch", "batch", str),
            ("s per call", "sec_per_call", NUM2),
            ("s per patch", "sec_per_patch", NUM3),
            ("patches/s", "patches_per_s", NUM2),
            PEAK,
        ],
    ),
    "whole_slide": (
        "Whole slide (synthesize_slide, 50% window overlap, batch 16)",
        [
            ("spots", "spots", str),
            ("windows", "windows", str),
            ("slide (px)", "shape", lambda v: _shape(v[:2])),
            ("DDIM steps", "ddim_steps", str),
            ("s", "sec", NUM1),
            ("windows/s", "windows_per_s", NUM2),
            ("s per spot", "sec_per_spot", NUM3),
            PEAK,
        ],
    ),
    "loader": (
        "Loader against the fastest stage-2 step measured ({loader_step_images_per_s:.1f} images/s)",
        [
            ("loader", "loader", str),
            ("patches/s", "patches_per_s", NUM0),
            ("ratio to raw reader", "ratio_to_raw", NUM2),
            ("ratio to step images/s", "ratio_to_step_images_per_s", NUM2),
        ],
    ),
}


TEXT_KEYS = {"unet", "lever", "variant", "loader", "name", "adversarial"}


def table(rows: list[dict] | dict, columns: list) -> list[str]:
    rows = [rows] if isinstance(rows, dict) else rows
    lines = ["| " + " | ".join(c[0] for c in columns) + " |"]
    lines.append("|" + "|".join("---" if c[1] in TEXT_KEYS else "---:" for c in columns) + "|")
    lines += ["| " + " | ".join(fn(row.get(key)) for _, key, fn in columns) + " |" for row in rows]
    return lines


def profile_lines(x: dict) -> list[str]:
    return [
        f"## Where the step goes (all eager levers, batch {x['batch']}, torch.profiler)",
        "",
        f"Wall {x['wall_s_per_step'] * 1e3:.1f} ms per step under the profiler, kernels "
        f"{x['kernel_s_per_step'] * 1e3:.1f} ms ({x['device_busy_fraction']:.0%} busy), {x['kernels_per_step']:.0f} "
        f"kernel launches per step.",
        "",
        *table(
            x["top"],
            [
                ("kernel / op", "name", lambda v: f"`{v}`"),
                ("ms per step", "s_per_step", lambda v: f"{v * 1e3:.2f}"),
                ("calls per step", "calls_per_step", NUM0),
            ],
        ),
        "",
    ]


def render(results: dict) -> str:
    """The whole report: a header naming the device and command, then one table per measured section."""
    d = results.get("device", {})
    lines = [
        f"# Device benchmark ({'smoke, CPU' if d.get('smoke') else d.get('name', '?')})",
        "",
        f"`python scripts/device_benchmark.py{' --smoke' if d.get('smoke') else ''}`: {d.get('name')}, "
        f"torch {d.get('torch')} (CUDA {d.get('cuda')}), MONAI {d.get('monai')}, diffusers {d.get('diffusers')}; "
        f"{d.get('config')}; bf16 peak: datasheet {NUM0(d.get('datasheet_bf16_tflops'))} TFLOP/s, "
        f"measured matmul {NUM0(d.get('measured_bf16_matmul_tflops'))} TFLOP/s; total {results.get('elapsed_s')} s.",
        "",
    ]
    sections = results["sections"]
    for name in sections:
        if name == "profile":
            lines += profile_lines(sections[name])
        elif name in TABLES:
            title, columns = TABLES[name]
            values = {k: (v if v is not None else float("nan")) for k, v in results.items() if not isinstance(v, dict)}
            lines += [f"## {title.format(**values)}", "", *table(sections[name], columns), ""]
    for name, error in results["errors"].items():
        lines.append(f"- **{name} failed**: `{error}`")
    for note in results["skipped"]:
        lines.append(f"- skipped: {note}")
    return "\n".join(lines) + "\n"
