"""Peak memory and time of one training iteration of each stage at the default sizes of ``configs/train.json``.

Each row runs in a fresh subprocess (so that its peak resident set size is its own), builds the networks, optimisers,
iteration and inferer from ``configs/train.json`` (512-px patches, 4x64x64 latents, the default networks) and runs a
few iterations of a ``SupervisedTrainer`` on random batches of ``--batch-size`` on the CPU:

- stage 1: ``AutoencoderKLIteration`` (autoencoder step and, with the adversarial term on as after
  ``adv_start_iteration``, the patch-discriminator step);
- stage 2: the frozen autoencoder encodes the batch (``LatentDiffusionPrepareBatch``), then the GeneCondNet-conditioned
  UNet's forward (``DiffusionInferer``), MSE loss, backward and the AdamW step (128 genes, 6 neighbours).

The rows change one thing against the stage's first row (the defaults, float32): the autoencoder without its
non-local mid-blocks (resnet, attention, resnet at the 64x64 level of the encoder and of the decoder), MONAI's
``AutoencoderKL(use_checkpoint=True)`` (whole encoder and decoder recomputed), ``bundle.memory.activation_checkpointing``
(resnet and attention blocks recomputed), bf16 autocast (``amp: true``). Peak RSS is sampled every millisecond over
the iterations (``bundle.profiling.PeakMemory``); the time is the fastest iteration's (the first one also allocates;
on a shared machine the others vary). With ``--flops`` one more iteration runs after the measured ones under
``torch.utils.flop_counter.FlopCounterMode`` (convolutions, matrix products, attention; recomputed blocks included),
which would keep checkpointed activations alive if it ran during them. Example (about 30 minutes on 2 idle cores):

    python scripts/benchmark_memory.py --flops
    python scripts/benchmark_memory.py --rows stage1 stage1-checkpointing --iterations 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# row name -> (stage, description, config overrides, flags)
ROWS: dict[str, tuple[int, str, dict, dict]] = {
    "stage1": (1, "defaults (fp32)", {}, {}),
    "stage1-no-nonlocal": (
        1,
        "no non-local mid-blocks (64x64 level)",
        {
            "autoencoder_kwargs#with_encoder_nonlocal_attn": False,
            "autoencoder_kwargs#with_decoder_nonlocal_attn": False,
        },
        {},
    ),
    "stage1-monai-checkpoint": (1, "AutoencoderKL(use_checkpoint=True)", {}, {"monai_checkpoint": True}),
    "stage1-checkpointing": (1, "activation_checkpointing: true", {"activation_checkpointing": True}, {}),
    "stage1-bf16": (1, "amp: true (bf16 autocast)", {"amp": True}, {}),
    "stage1-bf16-checkpointing": (
        1,
        "amp + activation_checkpointing",
        {"amp": True, "activation_checkpointing": True},
        {},
    ),
    "stage2": (2, "defaults (fp32)", {}, {}),
    "stage2-checkpointing": (2, "activation_checkpointing: true", {"activation_checkpointing": True}, {}),
    "stage2-bf16": (2, "amp: true (bf16 autocast)", {"amp": True}, {}),
}


def load_config(overrides: dict):
    """``configs/train.json`` with a 128-gene, 6-neighbour panel, a randomly initialised frozen autoencoder and the
    row's overrides (no dataset, no checkpoint files needed)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train.json"))
    settings = {
        "bundle_root": str(ROOT),
        "device": "$torch.device('cpu')",
        "num_genes": 128,
        "num_neighbors": 6,
        "scale_factor": 1.0,
        "frozen_autoencoder": "$@autoencoder_def.to(@device).eval()",
        "adv_start_iteration": 0,
        **overrides,
    }
    for key, value in settings.items():
        parser[key] = value
    return parser


def stage1_parts(parser, flags: dict) -> dict:
    """The stage-1 trainer's arguments as ``configs/train.json`` builds them."""
    import torch

    autoencoder = parser.get_parsed_content("autoencoder")
    if flags.get("monai_checkpoint"):
        autoencoder.use_checkpoint = True
    size = parser.get_parsed_content("patch_size")
    return {
        "network": parser.get_parsed_content("autoencoder_train#trainer#network"),
        "optimizer": parser.get_parsed_content("autoencoder_train#optimizer"),
        "loss_function": torch.nn.L1Loss(),
        "iteration_update": parser.get_parsed_content("autoencoder_train#iteration"),
        "batch": lambda b: {"image": torch.rand(b, 3, size, size) * 2.0 - 1.0},
    }


def stage2_parts(parser) -> dict:
    """The stage-2 trainer's arguments as ``configs/train.json`` builds them."""
    import torch

    size = parser.get_parsed_content("patch_size")
    neighbours, genes = parser.get_parsed_content("num_neighbors"), parser.get_parsed_content("num_genes")
    return {
        "network": parser.get_parsed_content("train#trainer#network"),
        "optimizer": parser.get_parsed_content("optimizer"),
        "loss_function": torch.nn.MSELoss(),
        "prepare_batch": parser.get_parsed_content("prepare_batch"),
        "inferer": parser.get_parsed_content("train#trainer#inferer"),
        "batch": lambda b: {
            "image": torch.rand(b, 3, size, size) * 2.0 - 1.0,
            "expression": torch.rand(b, 1 + neighbours, genes) * 3.0,
        },
    }


def run_row(name: str, iterations: int, batch_size: int, count_flops: bool = False) -> dict:
    """Build the row's trainer and run ``iterations`` iterations; its peak RSS and iteration times (and, with
    ``count_flops``, the floating-point operations of one more iteration)."""
    import torch
    from ignite.engine import Events
    from monai.engines import SupervisedTrainer
    from torch.utils.flop_counter import FlopCounterMode

    from bundle.memory import checkpointed_blocks
    from bundle.profiling import PeakMemory, rss_mib
    from bundle.training import count_parameters

    stage, _, overrides, flags = ROWS[name]
    torch.manual_seed(0)
    parser = load_config(overrides)
    parts = stage1_parts(parser, flags) if stage == 1 else stage2_parts(parser)
    make_batch = parts.pop("batch")
    batches = [make_batch(batch_size) for _ in range(iterations)]
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        epoch_length=iterations,
        train_data_loader=batches,
        amp=parser.get_parsed_content("monai_amp"),
        amp_kwargs=parser.get_parsed_content("amp_kwargs"),
        decollate=False,
        **parts,
    )
    times: list[float] = []
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda _: times.append(time.perf_counter()))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _: times.append(time.perf_counter() - times.pop()))
    before = rss_mib()
    with PeakMemory("cpu") as memory:
        trainer.run()
    loss, seconds, gflop = float(trainer.state.output["loss"]), [round(t, 2) for t in times], None
    if count_flops:  # one more iteration, after the measured ones: the counter keeps checkpointed activations alive
        trainer.state.max_epochs += 1
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=iterations + 1), lambda engine: engine.terminate())
        with FlopCounterMode(display=False) as flops:
            trainer.run()
        gflop = round(flops.get_total_flops() / 1e9, 1)
    return {
        "row": name,
        "rss_before_mib": round(before, 1),
        "peak_rss_mib": round(memory.peak_mib, 1),
        "rise_mib": round(memory.delta_mib, 1),
        "seconds": seconds,
        "gflop": gflop,
        "loss": loss,
        "parameters": count_parameters(parts["network"]),
        "checkpointed_blocks": len(checkpointed_blocks(parts["network"])),
        "threads": torch.get_num_threads(),
    }


def measure(name: str, iterations: int, batch_size: int, threads: int | None, count_flops: bool) -> dict:
    """Run one row in a fresh Python process and return its result."""
    command = [sys.executable, __file__, "--child", name, "--iterations", str(iterations)]
    command += ["--batch-size", str(batch_size)] + (["--threads", str(threads)] if threads else [])
    command += ["--flops"] if count_flops else []
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"row {name} failed (exit code {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def format_table(results: list[dict]) -> str:
    """Markdown table; ratios against the first row of the same stage."""
    header = (
        "| stage | row | peak RSS (MiB) | x baseline | rise over start (MiB) | GFLOP / iteration | s / iteration | "
        "x baseline | loss |\n|---|---|---|---|---|---|---|---|---|"
    )
    lines, base = [header], {}
    for r in results:
        stage, description = ROWS[r["row"]][:2]
        seconds = min(r["seconds"])
        base.setdefault(stage, (r["peak_rss_mib"], seconds))
        peak0, sec0 = base[stage]
        lines.append(
            f"| {stage} | {description} | {r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] / peak0:.2f} | "
            f"{r['rise_mib']:.0f} | {'-' if r['gflop'] is None else round(r['gflop'])} | {seconds:.1f} | "
            f"{seconds / sec0:.2f} | {r['loss']:.4f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="rows to measure, in order")
    parser.add_argument("--iterations", type=int, default=2, help="iterations per row (the fastest is reported)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--flops", action="store_true", help="count the floating-point operations of one more iteration (not timed)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    parser.add_argument("--child", choices=list(ROWS), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.batch_size < 1:
        parser.error("--iterations and --batch-size must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(run_row(args.child, args.iterations, args.batch_size, args.flops)))
        return 0
    results = []
    for name in args.rows:
        start = time.perf_counter()
        result = measure(name, args.iterations, args.batch_size, args.threads, args.flops)
        results.append(result)
        print(
            f"{name}: peak RSS {result['peak_rss_mib']:.0f} MiB, iterations {result['seconds']} s, loss "
            f"{result['loss']:.4f} ({time.perf_counter() - start:.0f} s with start-up)",
            flush=True,
        )
    print(f"\nbatch {args.batch_size}, {results[0]['threads']} threads, CPU\n")
    print(format_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
