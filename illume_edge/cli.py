"""`illume-edge` command line. Export-side commands import torch lazily; runtime commands never do."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


def cmd_make_tiny(args) -> int:
    from .export.checkpoint import make_tiny

    paths = make_tiny(args.preset, args.out, seed=args.seed)
    print(f"wrote a random {args.preset} checkpoint to {args.out} (mllm/, dualvitok/"
          f"{', diffusion_decoder/' if paths.diffusion_decoder else ''})")
    return 0


def cmd_export(args) -> int:
    from .export.checkpoint import CheckpointPaths, load_checkpoint
    from .export.engine import export_engine

    root = Path(args.checkpoint)
    paths = CheckpointPaths.from_dir(root)
    import torch

    dtype = torch.float16 if args.precision == "fp16" else torch.float32  # fp16 halves the export's memory
    mods = load_checkpoint(paths if args.preset else root, preset_name=args.preset, dtype=dtype)
    export_engine(mods, args.out, paths.mllm / "tokenizer.json", precision=args.precision,
                  source={"checkpoint": str(root), "preset": args.preset or ""}, llm_graph=args.llm_graph,
                  progress=lambda s: print(f"[export] {s}", flush=True))
    print(f"engine written to {args.out}")
    return 0


def cmd_info(args) -> int:
    from .manifest import read_manifest

    m = read_manifest(args.engine)
    cfg = m.model_config()
    p = m.producer
    print(f"engine {args.engine}: {m.name} (format {m.format_version}, {m.precision})")
    print(f"  produced {p.created} by illume-edge {p.illume_edge}: torch {p.torch}, transformers {p.transformers}, "
          f"diffusers {p.diffusers}, onnx {p.onnx}, onnxruntime {p.onnxruntime}, opset {p.opset}")
    llm = cfg.llm
    print(f"  llm: {llm.arch}, {llm.num_layers} layers, hidden {llm.hidden_size}, heads {llm.num_heads}/"
          f"{llm.num_kv_heads}, ffn {llm.intermediate_size}, vocab rows {llm.vocab_rows}, "
          f"tokenizer {cfg.tokenizer_len}")
    for b in cfg.branches:
        print(f"  input branch {b.name}: {b.encoder.kind} -> {b.in_dim} -> projector -> {llm.hidden_size} "
              f"(level {b.level} grid)")
    for i, lv in enumerate(cfg.levels):
        a, z = lv.token_range
        print(f"  output level{i} {lv.name}: {lv.codebook_size} codes x {lv.code_dim}, ids [{a}, {z})")
    print(f"  anchors: {', '.join(f'{h}x{w}' for h, w in cfg.anchors)}")
    print("  components:")
    for name, c in sorted(m.components.items()):
        size = sum(f.bytes for f in c.files)
        ins = ", ".join(f"{t.name}{list(t.shape)}:{t.dtype}" for t in c.inputs[:4])
        more = f" (+{len(c.inputs) - 4} more)" if len(c.inputs) > 4 else ""
        outs = ", ".join(f"{t.name}{list(t.shape)}" for t in c.outputs[:2])
        print(f"    {name:<14} {c.kind} {c.precision} {_human_bytes(size):>9}  in: {ins}{more}  out: {outs}"
              f"{' ...' if len(c.outputs) > 2 else ''}")
        if c.dynamic_ranges:
            print(f"    {'':<14} dynamic: " + ", ".join(f"{k} {v[0]}..{v[1]}" for k, v in c.dynamic_ranges.items()))
    print("  assets: " + ", ".join(f"{k} ({_human_bytes(f.bytes)})" for k, f in sorted(m.assets.items())))
    return 0


def cmd_build_engines(args) -> int:
    from .tensorrt_build import BuildOptions, build_engines

    options = BuildOptions(precision=args.precision, int8=args.int8, workspace_gb=args.workspace_gb,
                           components=tuple(args.components) if args.components else None)
    manifest = build_engines(args.engine, options, progress=lambda s: print(f"[tensorrt] {s}", flush=True))
    print(f"{len(manifest.plans)} plan(s) listed in {args.engine}/manifest.json")
    return 0


def _progress_bar(stage: str, done: int, total: int) -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    end = "\n" if done >= total else ""
    print(f"\r  {stage:<9} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end=end, file=sys.stderr,
          flush=True)


def _timings(t: dict[str, float]) -> str:
    return "timings: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in t.items())


def _save(image, out: str) -> None:
    from PIL import Image

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(out)


def _pipeline(args):
    from .runtime.pipeline import Pipeline
    from .runtime.provider_options import parse_cli

    return Pipeline.load(args.engine, threads=args.threads, device=args.device, sampler=args.sampler,
                         cuda_graph=args.cuda_graph, provider_options=parse_cli(args.provider_option))


def cmd_understand(args) -> int:
    pipe = _pipeline(args)
    stream = pipe.understand(Path(args.image), args.question, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, seed=args.seed, stream=True)
    for piece in stream:
        print(piece, end="", flush=True)
    print()
    print(_timings(stream.result.timings), file=sys.stderr)
    return 0


def _image_kwargs(args) -> dict:
    return dict(seed=args.seed, cfg=args.cfg, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                decoder=args.decoder, steps=args.steps, progress=None if args.quiet else _progress_bar)


def cmd_generate(args) -> int:
    pipe = _pipeline(args)
    result = pipe.generate(args.prompt, resolution=args.resolution, best_of=args.best_of, **_image_kwargs(args))
    _save(result.image, args.out)
    print(f"wrote {args.out} ({result.image.shape[1]}x{result.image.shape[0]}, {result.decoder} decoder)")
    if args.best_of > 1:
        scores = [c.assessment["score"] if c.assessment else None for c in result.candidates]
        print(f"best of {args.best_of} (seed {result.seed}; self-assessed scores {scores}): {result.assessment}")
    print(_timings(result.timings), file=sys.stderr)
    return 0


def cmd_edit(args) -> int:
    pipe = _pipeline(args)
    result = pipe.edit(Path(args.image), args.instruction, **_image_kwargs(args))
    _save(result.image, args.out)
    print(f"wrote {args.out} ({result.image.shape[1]}x{result.image.shape[0]}, {result.decoder} decoder)")
    print(_timings(result.timings), file=sys.stderr)
    return 0


def demo_image(size: int = 128):
    """A small scene to question and edit: a red circle left of a blue square on white."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    q = size // 8
    draw.ellipse((q, 3 * q, 3 * q, 5 * q), fill=(220, 30, 30))
    draw.rectangle((5 * q, 3 * q, 7 * q, 5 * q), fill=(30, 60, 220))
    return img


def _demo_tasks(cfg):
    """(source image, questions, prompts, edit instruction, truth notes) for the demo.

    ILLUME-nano: a held-out scene of its world (never seen in training), its questions, GenEval-style prompts
    and an edit, with the true answers printed next to the model's. Other models: a fixed drawn scene."""
    import numpy as np

    if cfg.name == "illume-nano":
        from .nano import world

        rng = np.random.default_rng(3)
        wcfg = world.WorldConfig()
        scene = world.heldout_scenes(8, wcfg)[5]
        qas = [q for q in (world.make_qa(scene, rng, k) for k in ("describe", "count", "color", "position"))
               if q is not None]
        edit = next(e for e in (world.make_edit(scene, rng, k, wcfg) for k in ("recolor", "move", "add", "remove"))
                    if e is not None)
        prompts = ["a red circle to the left of a blue square", "two green triangles", "a yellow square"]
        return (world.render(scene, wcfg), [(q.question, q.answer) for q in qas], prompts, edit.instruction,
                world.describe(edit.target))
    questions = [("What shapes are in the image?", None), ("What color is the circle?", None)]
    return (np.asarray(demo_image()), questions, ["a red circle to the left of a blue square", "a green triangle"],
            "make the square yellow", None)


BENCHES = {"decode": "benchmarks.llm_decode", "stages": "benchmarks.stages"}


def cmd_bench(args) -> int:
    """`make bench` from the command line: the repository's benchmarks/ (they build random models with torch
    and time the peers, so they live in the source checkout, not in the installed package)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "stages.py").is_file():
        raise FileNotFoundError(f"illume-edge bench runs the benchmarks/ folder of a source checkout; none beside "
                                f"{Path(__file__).resolve().parent} (install with `pip install -e .` from the "
                                f"repository, or run `make bench` there)")
    names = list(BENCHES) if args.which == "all" else [args.which]
    for name in names:
        rc = subprocess.call([sys.executable, "-m", BENCHES[name], *args.bench_args], cwd=root)
        if rc:
            return rc
    return 0


def cmd_demo(args) -> int:
    """Understanding (streamed), generation and editing on one engine; images and timings to --out."""
    from PIL import Image

    pipe = _pipeline(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source, questions, prompts, instruction, edit_truth = _demo_tasks(pipe.cfg)
    Image.fromarray(source).save(out / "input.png")
    print(f"engine {args.engine} ({pipe.cfg.name}); input image {out / 'input.png'}")
    for question, truth in questions:
        print(f"Q: {question}\nA: ", end="", flush=True)
        stream = pipe.understand(source, question, max_new_tokens=args.max_new_tokens, stream=True)
        for piece in stream:
            print(piece, end="", flush=True)
        print(f"\n   {_timings(stream.result.timings)}" + (f"\n   (truth: {truth})" if truth is not None else ""))
    progress = None if args.quiet else _progress_bar
    for i, prompt in enumerate(prompts):
        result = pipe.generate(prompt, seed=i, steps=args.steps, progress=progress)
        path = out / f"generate_{i}.png"
        _save(result.image, str(path))
        print(f"generate {prompt!r} -> {path} ({result.decoder})\n   {_timings(result.timings)}")
    result = pipe.edit(source, instruction, seed=0, steps=args.steps, progress=progress)
    _save(result.image, str(out / "edit.png"))
    print(f"edit {instruction!r} -> {out / 'edit.png'} ({result.decoder})\n   {_timings(result.timings)}"
          + (f"\n   (target: {edit_truth})" if edit_truth is not None else ""))
    return 0


def _runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", required=True, help="engine folder (illume-edge export ... --out DIR)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the task's)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the machine's cores)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the KV cache, hidden state and logits live (cuda: with onnxruntime-gpu)")
    p.add_argument("--sampler", default="auto", choices=["auto", "host", "device"],
                   help="image-token draw: numpy on the host or the CUDA kernel (auto: the kernel with --device cuda)")
    p.add_argument("--cuda-graph", dest="cuda_graph", action="store_true", default=None,
                   help="replay the LLM decode step as a CUDA graph (CUDA provider; fused engines)")
    p.add_argument("--provider-option", dest="provider_option", action="append", metavar="PROVIDER:KEY=VALUE",
                   help="an onnxruntime provider option, e.g. CUDAExecutionProvider:cudnn_conv_algo_search=HEURISTIC "
                        "(repeatable; over the manifest's provider_options and ILLUME_EDGE_PROVIDER_OPTIONS)")


def _image_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output image (.png)")
    p.add_argument("--cfg", type=float, default=None, help="LLM classifier-free guidance scale")
    p.add_argument("--top-k", dest="top_k", type=int, default=None)
    p.add_argument("--top-p", dest="top_p", type=float, default=None)
    p.add_argument("--decoder", default="auto", choices=["auto", "diffusion", "vq"])
    p.add_argument("--steps", type=int, default=None, help="diffusion decoder steps")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    from .config import PRESETS

    ap = argparse.ArgumentParser(prog="illume-edge", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("make-tiny", help="write a random checkpoint of a preset in the release layout")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_make_tiny)

    from .manifest import DEFAULT_LLM_GRAPH, LLM_GRAPHS  # torch-free

    p = sub.add_parser("export", help="export a checkpoint to an engine folder (ONNX graphs + manifest)")
    p.add_argument("--checkpoint", required=True, help="folder with mllm/, dualvitok/, diffusion_decoder/")
    p.add_argument("--out", required=True, help="engine folder, e.g. engines/NAME")
    p.add_argument("--preset", choices=sorted(PRESETS), help="model config (default: the checkpoint's "
                                                             "illume_edge.json)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16"],
                   help="fp16: fp16 weights and compute behind fp32 graph inputs/outputs (VAE stays fp32)")
    p.add_argument("--llm-graph", dest="llm_graph", default=DEFAULT_LLM_GRAPH, choices=LLM_GRAPHS,
                   help="fused: onnxruntime contrib ops (GroupQueryAttention, fused norms and RoPE), the fast "
                        "path on onnxruntime CPU/CUDA; portable: standard ONNX ops, for TensorRT plans")
    p.set_defaults(fn=cmd_export)

    from .export.quantize import add_quantize_parser  # torch-free: onnxruntime's quantizer only

    add_quantize_parser(sub)

    p = sub.add_parser("build-engines", help="build TensorRT plans from an engine's ONNX (needs an NVIDIA GPU)")
    p.add_argument("--engine", required=True)
    p.add_argument("--precision", default="fp16", choices=["fp16", "fp32"])
    p.add_argument("--int8", action="store_true", help="also allow INT8 kernels")
    p.add_argument("--workspace-gb", dest="workspace_gb", type=float, default=4.0)
    p.add_argument("--components", nargs="*", help="default: every ONNX component")
    p.set_defaults(fn=cmd_build_engines)

    p = sub.add_parser("info", help="print an engine's manifest in human form")
    p.add_argument("engine")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("understand", help="answer a question about an image (streams the answer)")
    _runtime_args(p)
    p.add_argument("--image", required=True)
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=256)
    p.add_argument("question")
    p.set_defaults(fn=cmd_understand)

    p = sub.add_parser("generate", help="draw an image from a prompt")
    _runtime_args(p)
    _image_args(p)
    p.add_argument("--resolution", default=None, help="HxW, one of the model's anchors (default: the first)")
    p.add_argument("--best-of", dest="best_of", type=int, default=1,
                   help="generate N candidates and keep the one the model's own assessment ranks best")
    p.add_argument("prompt")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("demo", help="run understanding, generation and editing on an engine; save to --out")
    _runtime_args(p)
    p.add_argument("--out", default="outputs")
    p.add_argument("--steps", type=int, default=None, help="diffusion decoder steps")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=48)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("bench", help="run the benchmarks (make bench): LLM decode and/or every stage vs peers")
    p.add_argument("which", nargs="?", default="all", choices=["all", *BENCHES])
    p.add_argument("bench_args", nargs=argparse.REMAINDER,
                   help="passed to the bench, e.g. `stages --shape smoke` (see python -m benchmarks.stages -h)")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("edit", help="edit an image by an instruction")
    _runtime_args(p)
    _image_args(p)
    p.add_argument("--image", required=True)
    p.add_argument("instruction")
    p.set_defaults(fn=cmd_edit)
    return ap


def main(argv: list[str] | None = None) -> int:
    from .errors import CheckpointError, ConfigError, EngineError

    args = build_parser().parse_args(argv)
    known = (EngineError, ConfigError, CheckpointError, ValueError, FileNotFoundError)
    try:
        return args.fn(args)
    except known as e:
        print(f"illume-edge {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
