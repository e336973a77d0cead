"""Per-stage latency of the whole runtime (vision, prefill, decode, image-token loop, detokenizers, end to end)
at ILLUME+ architecture shapes with random weights, against PyTorch eager on the same weights.

    python -m benchmarks.stages                  # CPU preset, ~6 minutes on 2 cores
    python -m benchmarks.stages --full           # longer prompts, all repetitions, fp32 end to end too
    python -m benchmarks.stages --shape smoke    # tiny shapes, ~2 minutes (checks the harness end to end)

Every side runs in its own process, so that each one's peak RSS is its own:
- export (torch): seeded random modules of the shape -> fp32 engine (every graph) -> int4 engine (LLM + heads
  int4 weight-only, vision encoders and UNet dynamic int8: `quantize --precision int4 --vision int8 --unet int8`);
- eager (torch): the same seeded modules, timed as the export side's reference runs them (transformers
  forward with a DynamicCache per CFG row and the full LM head, diffusers UNet / VAE, the torch encoders);
- ours (one process per precision): the runtime only; the worker checks that torch was never imported. The
  int4 worker skips the stand-alone VQ decoder and VAE stages: the int4 engine runs the fp32 graphs there.
  The image-token loops and end-to-end requests run on the int4 engine, the deployment precision (--full:
  on fp32 too; Protocol.e2e_precisions).

Stages, each with one warm-up, then up to 3 repetitions (a multi-second stage stops after 2 once its timed
runs pass 6 s; --full runs all 3), median and min-max: image preprocessing, each vision branch, prefill
(time to first token) at several prompt lengths, decode ms/token at batch 1, the image-token loop at CFG batch 2
and at batch 1 (ms per image token, forced tokens included, split into LLM / head / sampler / host work), the
VQ decoder, one UNet step (CFG batch 2), the VAE decoder, and end to end: understanding (a fixed number of
answer tokens, EOS ignored; a 448x336 photo, --full 640x480), 256x256 generation and editing. The eager
side's end-to-end figures are composed from its measured stage medians (its full image loop would take minutes
per image on 2 cores); ours are measured directly. Writes benchmarks/results/<date>-<host>-stages.json and
prints a markdown table.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import numpy as np

from benchmarks.machine import (BANDWIDTH_STATISTIC, REPO, bandwidth_label, cores, cpu_model,
                                git_commit, measure_read_bandwidth, peak_rss_mb, versions, write_result)

SEED = 0


# ---------------------------------------------------------------------------------------------------------
# Shapes (ModelConfig builders; torch-free, every worker rebuilds the config from its name)
# ---------------------------------------------------------------------------------------------------------
def cpu_shape():
    """ILLUME+ layout with its real vocabulary and code books (32768 semantic + 98304 pixel codes), a
    Qwen2.5-0.5B-shaped LLM, the semantic ViT at Qwen2-VL width (1280, 16 heads, 3584-wide merger) with 4 of
    its 32 blocks, the MoVQ pixel encoder at release width with 1 residual block per level instead of 2, a
    64-channel MoVQ VQ decoder, and a small SDXL-layout UNet / VAE decoding at the LLM resolution (no 2x
    super-resolution, so that a 256x256 generation's UNet runs on a 32x32 latent)."""
    from illume_edge.config import (DiffusionDecoderConfig, LLMConfig, MoVQConfig,
                                    UNetConfig, VAEConfig, VQDecoderConfig, illume_plus)

    base = illume_plus("3b")
    llm = LLMConfig("qwen2", 24, 896, 14, 2, 4864, vocab_rows=base.llm.vocab_rows, rope_theta=1_000_000.0,
                    rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=32768, max_batch=2)
    semantic, pixel = base.branches
    semantic = dataclasses.replace(semantic, encoder=dataclasses.replace(semantic.encoder, depth=4))
    pixel = dataclasses.replace(pixel, encoder=dataclasses.replace(
        pixel.encoder, movq=dataclasses.replace(pixel.encoder.movq, num_res_blocks=1)))
    unet = UNetConfig(block_out_channels=(64, 128, 256), layers_per_block=1, transformer_layers_per_block=(1, 1, 1),
                      attention_head_dim=(2, 4, 8), cross_attention_dim=512)
    diffusion = DiffusionDecoderConfig(unet=unet, vae=VAEConfig(block_out_channels=(64, 128, 256, 256),
                                                                layers_per_block=1),
                                       upscale=1, resolutions=tuple((w, h) for h, w in base.anchors),
                                       default_steps=25)
    vq = VQDecoderConfig(movq=MoVQConfig(ch=64, num_res_blocks=1, z_channels=64, embed_dim=64))
    return dataclasses.replace(base, name="illume-plus-cpu-bench", llm=llm, branches=(semantic, pixel),
                               vq_decoder=vq, diffusion=diffusion).validate()


def smoke_shape():
    """The tiny-plus preset: every stage in seconds."""
    from illume_edge.config import tiny_plus

    return dataclasses.replace(tiny_plus(), name="smoke").validate()


SHAPES: dict[str, Callable] = {"cpu": cpu_shape, "smoke": smoke_shape}


@dataclasses.dataclass(frozen=True)
class Protocol:
    """What every worker runs (the same for ours and eager)."""
    reps: int = 3  # repetitions of the short stages (after one warm-up)
    # a stage stops repeating once its timed runs pass this many seconds, after at least 2 (None: all reps)
    rep_budget_s: float | None = 6.0
    e2e_reps: int = 1  # repetitions of the end-to-end runs and of the full image loops (after the stage warm-ups)
    # engines that also run the image-token loops and the end-to-end requests (the others: per-stage kernels)
    e2e_precisions: tuple[str, ...] = ("int4",)
    prompt_lengths: tuple[int, ...] = (128, 256, 512)
    decode_prompt: int = 128
    decode_steps: int = 32
    image_steps_eager: int = 16  # eager image-token steps timed (its full loop is composed from them)
    answer_tokens: int = 32  # understanding: answer tokens, EOS ignored
    source_hw: tuple[int, int] = (336, 448)  # the understanding input photo's size
    image_hw: tuple[int, int] = (256, 256)  # generation resolution, and the size of the photo that is edited
    diffusion_steps: int = 25
    threads: int = 2

    @classmethod
    def from_dict(cls, d: dict) -> "Protocol":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# Per shape: the protocol's sizes (the smoke shape's are small enough for the test suite)
PROTOCOL_SIZES: dict[str, dict] = {
    "cpu": {},
    "smoke": {"prompt_lengths": (16, 64), "decode_prompt": 16, "decode_steps": 4, "image_steps_eager": 4,
              "answer_tokens": 4, "diffusion_steps": 2, "reps": 1, "e2e_precisions": ("fp32", "int4")},
}


# --full (the cpu shape): longer prompts, every stage's repetitions in full, and the fp32 engine end to end
# too; the default keeps `make bench` (both benches) near 10 minutes on 2 cores
FULL_PROTOCOL: dict = {"prompt_lengths": (128, 512, 1024), "rep_budget_s": None, "e2e_precisions": ("fp32", "int4"),
                       "source_hw": (480, 640)}


# ---------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------
QUESTION = "what is in the image?"
PROMPT = "a red circle to the left of a blue square"
EDIT = "make the red square green"


def stats(seconds: list[float]) -> dict:
    ms = [1e3 * s for s in seconds]
    return {"ms": statistics.median(ms), "min": min(ms), "max": max(ms), "n": len(ms)}


def repeat(fn: Callable[[], object], reps: int, warmup: int = 1, budget_s: float | None = None) -> dict:
    """Median and spread of `reps` timed runs after `warmup`; with `budget_s`, fewer (at least 2) once the
    timed runs have taken that long (multi-second stages)."""
    out: list[float] = []
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            out.append(time.perf_counter() - t0)
            if budget_s is not None and len(out) >= 2 and sum(out) >= budget_s:
                break
    return stats(out)


def repeat_stage(fn: Callable[[], object], p: Protocol) -> dict:
    """A stage's timing under the protocol: one warm-up, then `p.reps` runs within `p.rep_budget_s`."""
    return repeat(fn, p.reps, budget_s=p.rep_budget_s)


def time_greedy_decode(start: Callable[[], tuple[object, int]], step: Callable[[object, int], int],
                       p: Protocol) -> tuple[dict, list[int]]:
    """Batch-1 greedy decode: `start()` -> (state, first token) after the prompt, `step(state, token)` -> next
    token. Per repetition the mean seconds per step (one warm-up repetition, then reps // 2, at least 1);
    also the last repetition's first 8 tokens (the parity probe)."""
    per_rep, got = [], []
    for rep in range(1 + max(p.reps // 2, 1)):
        state, tok = start()
        times, got = [], []
        for _ in range(p.decode_steps):
            t0 = time.perf_counter()
            tok = step(state, tok)
            times.append(time.perf_counter() - t0)
            got.append(tok)
        if rep:
            per_rep.append(sum(times) / len(times))
    return stats(per_rep), got[:8]


def test_photo(h: int, w: int) -> np.ndarray:
    """A deterministic photo-like uint8 [h, w, 3]: smooth gradients and a few flat shapes (not noise, so that
    resizing and encoders see ordinary content)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([x / w, y / h, 0.5 + 0.5 * np.sin((x + y) / 40.0)], axis=-1) * 200 + 20
    img[h // 4:h // 2, w // 5:w // 3] = (220, 40, 40)
    img[h // 2:3 * h // 4, w // 2:3 * w // 4] = (40, 60, 220)
    return img.astype(np.uint8)


def text_ids(cfg, n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, cfg.tokens.endoftext, n).tolist()


# ---------------------------------------------------------------------------------------------------------
# Worker: export (torch)
# ---------------------------------------------------------------------------------------------------------
def build_seeded(cfg):
    import torch

    from illume_edge.export.modules import build_modules

    torch.manual_seed(SEED)
    return build_modules(cfg).eval()


def export_worker(shape: str, work: Path, threads: int) -> dict:
    import torch

    from illume_edge.export.engine import export_engine
    from illume_edge.export.quantize import quantize_engine
    from illume_edge.export.tokenizer_factory import save_tokenizer_files

    torch.set_num_threads(threads)
    cfg = SHAPES[shape]()
    t0 = time.perf_counter()
    mods = build_seeded(cfg)
    save_tokenizer_files(cfg, work / "tokenizer")
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    export_engine(mods, work / "engine-fp32", work / "tokenizer" / "tokenizer.json", progress=lambda s: None,
                  source={"benchmark": f"random weights, seed {SEED}"})
    export_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    quantize_engine(work / "engine-fp32", work / "engine-int4", "int4", vision="int8", unet="int8",
                    progress=lambda s: None)
    return {"build_s": build_s, "export_fp32_s": export_s, "quantize_int4_s": time.perf_counter() - t0,
            "peak_rss_mb": peak_rss_mb()}


# ---------------------------------------------------------------------------------------------------------
# Worker: ours (runtime only)
# ---------------------------------------------------------------------------------------------------------
def _timed_runner(engine):
    """An LLMRunner that accounts LLM calls and head calls, and a sampler wrapper, for the loop breakdown."""
    from illume_edge.runtime import decode_loops
    from illume_edge.runtime.decode_loops import Timings
    from illume_edge.runtime.llm_runner import LLMRunner

    acc = Timings()

    class TimedRunner(LLMRunner):
        def feed(self, state, tokens):
            t0, runs = time.perf_counter(), self.runs
            try:
                return super().feed(state, tokens)
            finally:
                acc.add("llm", time.perf_counter() - t0)
                acc.add("llm_calls", self.runs - runs)  # a fused-graph CFG feed may take several runs

        def logits(self, head, hidden=None, state=None):
            t0 = time.perf_counter()
            try:
                return super().logits(head, hidden, state)
            finally:
                acc.add("head", time.perf_counter() - t0)

    inner = decode_loops.guided_sample

    def timed_sample(*a, **k):
        t0 = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            acc.add("sampler", time.perf_counter() - t0)

    decode_loops.guided_sample = timed_sample
    return TimedRunner(engine), acc


def _loop_breakdown(loop_s: float, acc, positions: int, batch: int) -> dict:
    """ms per image token of one image loop, and where it went."""
    llm, head, sampler = (acc.stages.get(k, 0.0) for k in ("llm", "head", "sampler"))
    host = max(loop_s - llm - head - sampler, 0.0)
    per = 1e3 / positions
    return {"batch": batch, "positions": positions, "llm_calls": int(acc.stages.get("llm_calls", 0)),
            "ms_per_image_token": loop_s * per, "llm_ms": llm * per, "head_ms": head * per,
            "sampler_ms": sampler * per, "host_ms": host * per,
            "host_pct": 100 * (host + sampler) / loop_s if loop_s else 0.0}


# Stages whose graphs a quantized engine shares with the fp32 one (quantize_engine rewrites the LLM and heads
# only): the int4 worker does not time them again (the table says "fp32 graph").
FP32_GRAPH_STAGES = ("vision_semantic", "vision_pixel", "vq_decoder", "unet_step_b2", "vae_decoder")


def ours_worker(engine_dir: Path, p: Protocol, llm_stages_only: bool = False) -> dict:
    from illume_edge.runtime.decode_loops import Timings, sample_image_tokens, stream_text
    from illume_edge.runtime.detokenize import code_maps, initial_noise, merge_code_maps, upsample_nearest, vq_decode
    from illume_edge.runtime.engine import Engine
    from illume_edge.runtime.grammar import ImageGrammar
    from illume_edge.runtime.image_prep import preprocess_image
    from illume_edge.runtime.pipeline import Pipeline, to_rgb
    from illume_edge.runtime.prompts import generate_prompts, understand_prompt
    from illume_edge.runtime.sampler import SamplingParams
    from illume_edge.runtime.session import SessionOptions
    from illume_edge.runtime.vision import PromptTable, encode_image

    engine = Engine.load(engine_dir, SessionOptions(threads=p.threads), check_hash=False)
    runner, acc = _timed_runner(engine)
    pipe = Pipeline(engine)
    pipe.runner = runner
    cfg, out = engine.config, {"precision": engine.manifest.precision}
    photo = test_photo(*p.source_hw)

    out["preprocess"] = repeat_stage(lambda: preprocess_image(to_rgb(photo), cfg), p)
    pixels = preprocess_image(to_rgb(photo), cfg)
    comps = engine.manifest.components
    out["component_precisions"] = {n: c.precision for n, c in sorted(comps.items())}
    def own(prefix: str) -> bool:
        """Graphs this worker times: every one of the fp32 engine; of a quantized engine (llm_stages_only) those
        it requantized (quantize --vision / --unet int8), the fp32 worker having timed the others."""
        return any(not llm_stages_only or c.precision != "fp32" for n, c in comps.items() if n.startswith(prefix))

    own_vision = own("vision_")
    per_branch: dict[str, list[float]] = {}
    for i in range(1 + (p.reps if own_vision else 0)):  # one encode: the parity probe
        t = Timings()
        encoded = encode_image(engine, pixels, t)
        for name, s in t.stages.items():
            if i:
                per_branch.setdefault(name, []).append(s)
        if p.rep_budget_s is not None and i >= 2 and sum(map(sum, per_branch.values())) >= p.rep_budget_s:
            break  # as repeat(): at least 2 timed encodes
    out.update({name: stats(v) for name, v in per_branch.items()})
    out["parity_probe"] = {"vision_features_head": [float(x) for x in encoded.features[0][0, :4]]}

    greedy = SamplingParams(temperature=0.0)
    for n in p.prompt_lengths:
        ids = text_ids(cfg, n, n)
        out[f"prefill_{n}"] = repeat_stage(
            lambda: runner.logits("text", runner.prefill([ids], max_new_tokens=1).hidden).argmax(), p)

    def start():
        state = runner.prefill([text_ids(cfg, p.decode_prompt, 1)], max_new_tokens=p.decode_steps)
        return state, int(runner.logits("text", state=state)[0].argmax())

    def step(state, tok):
        runner.feed(state, np.array([[tok]], np.int64))
        return int(runner.logits("text", state=state)[0].argmax())

    out["decode_b1"], out["parity_probe"]["greedy_tokens"] = time_greedy_decode(start, step, p)

    h, w = p.image_hw
    positions = ImageGrammar(cfg, h, w).length
    requests = out["precision"] in p.e2e_precisions  # image loops and end-to-end requests (Protocol)

    def loop_result(runs: list[dict]) -> dict:
        ms = [r["ms_per_image_token"] for r in runs]
        return {**runs[len(runs) // 2], "ms_min": min(ms), "ms_max": max(ms), "n": len(runs)}

    # the image-token loop at batch 1 (CFG off) on the generation prompt; CFG batch 2 is timed inside the
    # end-to-end generation below (the same loop; one full loop fewer on the clock)
    gen = SamplingParams.from_defaults(cfg.defaults.generate, pipe.repetition_penalty)
    runs = []
    for rep in range(p.e2e_reps if requests else 0):
        acc.stages.clear()
        t = Timings()
        tokens = sample_image_tokens(runner, [generate_prompts(pipe.tokenizer, cfg, PROMPT, h, w)[0].ids()], None,
                                     h, w, dataclasses.replace(gen, cfg_scale=1.0), seed=rep, timings=t)
        runs.append(_loop_breakdown(t.stages["image_tokens"], acc, positions, 1))
    if runs:
        out["image_loop_b1"] = loop_result(runs)
        codes = tokens.codes
    else:  # the decoders' cost does not depend on the codes: seeded random ones on the same grids
        g = np.random.default_rng(SEED)
        codes = [g.integers(0, lv.codebook_size, cfg.level_grid(i, h, w)) for i, lv in enumerate(cfg.levels)]
    maps = code_maps(engine, codes)

    if engine.has("vq_decoder") and not llm_stages_only:
        out["vq_decoder"] = repeat_stage(lambda: vq_decode(engine, maps), p)
    if own("unet"):
        d = cfg.diffusion
        lat_h, lat_w = h * d.upscale // d.vae.downsample, w * d.upscale // d.vae.downsample
        merged = upsample_nearest(merge_code_maps(maps), lat_h, lat_w)
        feeds = {"latent": np.repeat(initial_noise(0, (1, d.unet.latent_channels, lat_h, lat_w)), 2, axis=0),
                 "timestep": np.full((2,), 500.0, np.float32),
                 "code_map": np.concatenate([np.zeros_like(merged), merged]),
                 "time_ids": np.zeros((2, d.unet.num_time_ids), np.float32)}
        unet, vae = engine.session("unet"), engine.session("vae_decoder")
        out["unet_step_b2"] = repeat_stage(lambda: unet.run(feeds), p)
        if not llm_stages_only:
            out["vae_decoder"] = repeat_stage(lambda: vae.run({"latent": feeds["latent"][:1]}), p)
    out["decoder"] = "diffusion" if engine.has("unet") else "vq"
    if not requests:
        out["peak_rss_mb"] = peak_rss_mb()
        out["torch_imported"] = "torch" in sys.modules
        return out

    # end to end
    def understand_e2e():  # Pipeline.understand's work with a fixed answer length: TTFT = the first piece
        t0, ttft = time.perf_counter(), None
        table = PromptTable(cfg)
        image_ids = table.add(encode_image(engine, preprocess_image(to_rgb(photo), cfg)))
        prompt = understand_prompt(pipe.tokenizer, cfg, QUESTION).expand([image_ids])
        for _ in stream_text(runner, pipe.tokenizer, prompt, table.table(), greedy, 0, p.answer_tokens,
                             ignore_eos=True):
            ttft = ttft or time.perf_counter() - t0
        return ttft, time.perf_counter() - t0

    runs = [understand_e2e() for _ in range(1 + p.e2e_reps)][1:]
    out["e2e_understand"] = {**stats([r[1] for r in runs]), "ttft_ms": 1e3 * statistics.median(r[0] for r in runs)}
    decoder = out["decoder"]
    edit_photo = test_photo(*p.image_hw)
    for name, fn in (("e2e_generate", lambda s: pipe.generate(PROMPT,
                                                               resolution=(h, w), seed=s, decoder=decoder,
                                                               steps=p.diffusion_steps)),
                     ("e2e_edit", lambda s: pipe.edit(edit_photo, EDIT, seed=s, decoder=decoder,
                                                      steps=p.diffusion_steps))):
        results, loops = [], []
        for rep in range(p.e2e_reps):
            acc.stages.clear()
            results.append(fn(rep))
            loops.append(_loop_breakdown(results[-1].timings["image_tokens"], acc, positions, 2))
        out[name] = {**stats([r.timings["total"] for r in results]),
                     "stages_ms": {k: 1e3 * v for k, v in results[-1].timings.items()}}
        if name == "e2e_generate":
            out["image_loop_b2"] = loop_result(loops)
    out["peak_rss_mb"] = peak_rss_mb()
    out["torch_imported"] = "torch" in sys.modules
    return out


# ---------------------------------------------------------------------------------------------------------
# Worker: PyTorch eager (the export side's reference modules, same seeded weights)
# ---------------------------------------------------------------------------------------------------------
def eager_worker(shape: str, tokenizer_json: Path, p: Protocol) -> dict:
    import torch
    from transformers import DynamicCache

    from illume_edge.config import ViTEncoderConfig
    from illume_edge.export.diffusion import time_ids_for, zero_text_conditioning
    from illume_edge.export.export_vision import reference_vq_decode
    from illume_edge.export.llm import reference_step
    from illume_edge.export.reference import ReferencePipeline
    from illume_edge.runtime.image_prep import letterbox_to_anchor, pixel_inputs, preprocess_image, vit_inputs
    from illume_edge.runtime.pipeline import to_rgb
    from illume_edge.runtime.prompts import TextTokenizer, edit_prompts, generate_prompts, understand_prompt

    torch.set_num_threads(p.threads)
    cfg = SHAPES[shape]()
    mods = build_seeded(cfg)
    ref = ReferencePipeline(mods, TextTokenizer.from_file(tokenizer_json, cfg))
    out: dict = {}
    photo = test_photo(*p.source_hw)
    pixels = preprocess_image(to_rgb(photo), cfg)
    with torch.inference_mode():
        for b in cfg.branches:  # branch_features, one branch at a time (host prep included, as ours)
            enc, proj = mods.encoders[b.name], mods.projectors[b.name]
            if isinstance(b.encoder, ViTEncoderConfig):
                def run(b=b, enc=enc, proj=proj):
                    v = vit_inputs(pixels, b.encoder)
                    o = enc(torch.from_numpy(v.pixel_values), grid_thw=torch.tensor([[1, v.grid[0], v.grid[1]]]))
                    return proj(o.pooler_output if hasattr(o, "pooler_output") else o)  # merged [N/4, out_dim]
            else:
                def run(b=b, enc=enc, proj=proj):
                    z = enc(torch.from_numpy(pixel_inputs(pixels, b.encoder)))
                    return proj(z[0].flatten(1).transpose(0, 1))  # [C, h, w] -> [h*w, C]
            out[f"vision_{b.name}"] = repeat_stage(run, p)
            if b.level == 0:
                out["parity_probe"] = {"vision_features_head": [float(x) for x in run()[0, :4]]}

        llm = mods.llm
        for n in p.prompt_lengths:
            ids = torch.tensor([text_ids(cfg, n, n)])
            out[f"prefill_{n}"] = repeat_stage(lambda: llm(input_ids=ids, cache=DynamicCache(config=llm.config),
                                                           use_cache=True, logits_to_keep=1).logits.argmax(), p)

        text_stop = cfg.head_ranges()["text"][1]

        def start():  # the state is the last output, replaced each step
            o = llm(input_ids=torch.tensor([text_ids(cfg, p.decode_prompt, 1)]),
                    cache=DynamicCache(config=llm.config), use_cache=True, logits_to_keep=1)
            return [o], int(o.logits[0, -1, :text_stop].argmax())

        def step(state, tok):
            state[0] = llm(input_ids=torch.tensor([[tok]]), cache=state[0].cache, use_cache=True, logits_to_keep=1)
            return int(state[0].logits[0, -1, :text_stop].argmax())

        out["decode_b1"], out["parity_probe"]["greedy_tokens"] = time_greedy_decode(start, step, p)

        # image-token steps as the reference loop runs them: each CFG row its own batch-1 forward, the full LM
        # head, then the level's range (forced tokens cost the same forward)
        h, w = p.image_hw
        cond, uncond = generate_prompts(ref.tokenizer, cfg, PROMPT, h, w)
        start, stop = cfg.levels[-1].token_range
        for batch in (2, 1):
            rows = [cond.ids(), uncond.ids()][:batch]
            states = [reference_step(llm, torch.tensor([r])) for r in rows]
            times = []
            for _ in range(p.image_steps_eager):
                t0 = time.perf_counter()
                logits = [ref._logits(hd, start, stop) for hd, _ in states]
                tok = start + int(logits[0][0].argmax())
                states = [reference_step(llm, torch.tensor([[tok]]), past=c) for _, c in states]
                times.append(time.perf_counter() - t0)
            out[f"image_step_b{batch}"] = stats(times[1:])

        # the prompts' prefill as the reference runs it: each CFG row its own forward over its embeddings
        def prefill_rows(rows):
            return [reference_step(llm, None, inputs_embeds=r) for r in rows]

        out["prefill_generate"] = repeat_stage(
            lambda: prefill_rows(ref._embed_rows(cond.ids(), uncond.ids(), None, -1)), p)

        def edit_prefix():  # host prep, both encoders, the edit prompt's two rows
            boxed, (eh, ew), _ = letterbox_to_anchor(to_rgb(test_photo(*p.image_hw)), cfg.anchors)
            seq = ref.image_embeddings(preprocess_image(boxed, cfg))
            ec, eu = edit_prompts(ref.tokenizer, cfg, EDIT, eh, ew)
            return prefill_rows(ref._embed_rows(ec.ids(-1), eu.ids(-1), seq, -1))

        out["edit_prefix"] = repeat(edit_prefix, max(p.reps // 2, 1))

        def understand_e2e():  # host prep, encoders, prefill of the whole prompt, answer tokens (EOS ignored)
            t0 = time.perf_counter()
            seq = ref.image_embeddings(preprocess_image(to_rgb(photo), cfg))
            ids = understand_prompt(ref.tokenizer, cfg, QUESTION).ids(-1)
            hidden, cache = reference_step(llm, None, inputs_embeds=ref.prompt_embeddings(ids, seq, -1))
            for step in range(p.answer_tokens):
                tok = int(np.argmax(ref._logits(hidden, 0, text_stop)[0]))
                ttft = time.perf_counter() - t0 if step == 0 else ttft
                if step + 1 < p.answer_tokens:
                    hidden, cache = reference_step(llm, torch.tensor([[tok]]), past=cache)
            return ttft, time.perf_counter() - t0

        runs = [understand_e2e() for _ in range(p.e2e_reps)]
        out["e2e_understand"] = {**stats([r[1] for r in runs]),
                                 "ttft_ms": 1e3 * statistics.median(r[0] for r in runs)}

        maps = ref.code_maps([np.random.default_rng(i).integers(0, lv.codebook_size, cfg.level_grid(i, h, w))
                              for i, lv in enumerate(cfg.levels)])
        if cfg.vq_decoder is not None:
            out["vq_decoder"] = repeat_stage(
                lambda: reference_vq_decode(mods.post_quant_conv, mods.vq_decoder, maps), p)
        if mods.unet is not None:
            d = cfg.diffusion
            lat = torch.randn(2, d.unet.latent_channels, h * d.upscale // d.vae.downsample,
                              w * d.upscale // d.vae.downsample)
            codes = torch.zeros(2, d.unet.code_channels, *lat.shape[-2:])
            text, pooled = zero_text_conditioning(d.unet, 2, lat)
            tid = torch.tensor([time_ids_for(d.unet, 0)] * 2, dtype=torch.float32)
            out["unet_step_b2"] = repeat_stage(
                lambda: mods.unet(torch.cat([lat, codes], 1), torch.tensor(500.0), encoder_hidden_states=text,
                                  return_dict=False, added_cond_kwargs={"text_embeds": pooled, "time_ids": tid}), p)
            out["vae_decoder"] = repeat_stage(
                lambda: mods.vae.decode(lat[:1] / mods.vae.config.scaling_factor, return_dict=False), p)
    out["peak_rss_mb"] = peak_rss_mb()
    return out


# ---------------------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------------------
def _in_subprocess(kind: str, args: dict, timeout: int) -> dict:
    """Run a worker in a fresh interpreter; its JSON result is the last stdout line."""
    code = "import json, sys; from benchmarks.stages import _worker_main; _worker_main(sys.argv[1], sys.argv[2])"
    proc = subprocess.run([sys.executable, "-c", code, kind, json.dumps(args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{kind} worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _worker_main(kind: str, raw: str) -> None:
    a = json.loads(raw)
    p = Protocol.from_dict(a["protocol"])
    if kind == "export":
        res = export_worker(a["shape"], Path(a["work"]), p.threads)
    elif kind == "ours":
        res = ours_worker(Path(a["engine"]), p, a.get("llm_stages_only", False))
    elif kind == "eager":
        res = eager_worker(a["shape"], Path(a["tokenizer"]), p)
    else:
        raise SystemExit(f"unknown worker {kind!r}: expected export, ours or eager")
    print(json.dumps(res))


def compose_eager_e2e(e: dict, cfg, p: Protocol) -> dict:
    """The eager side's generation and editing times: its measured prefix (prompt prefill; for editing also the
    host prep and both encoders) + its image-token loop (positions x its measured CFG step) + the diffusion
    decoder (steps x its measured UNet step + its VAE). Its understanding is measured whole."""
    from illume_edge.runtime.grammar import ImageGrammar

    positions = ImageGrammar(cfg, *p.image_hw).length
    loop = positions * e["image_step_b2"]["ms"]
    decoder = (p.diffusion_steps * e["unet_step_b2"]["ms"] + e["vae_decoder"]["ms"]) if "unet_step_b2" in e \
        else e["vq_decoder"]["ms"]
    tail = f"{positions} x image step (CFG) + " + (f"{p.diffusion_steps} x UNet step + VAE" if "unet_step_b2" in e
                                                   else "VQ decoder")
    return {"e2e_generate": {"ms": e["prefill_generate"]["ms"] + loop + decoder,
                             "composed": "prefill of both rows + " + tail},
            "e2e_edit": {"ms": e["edit_prefix"]["ms"] + loop + decoder,
                         "composed": "host prep + encoders + prefill of both rows + " + tail}}


def stage_rows(p: Protocol) -> list[tuple[str, str, str]]:
    """(result key, label, what one time is per) in table order."""
    h, w = p.image_hw
    return [("preprocess", f"image preprocessing ({p.source_hw[1]}x{p.source_hw[0]} photo)", "image"),
            ("vision_semantic", "vision: semantic ViT + projector", "image"),
            ("vision_pixel", "vision: pixel MoVQ encoder + projector", "image")] + \
        [(f"prefill_{n}", f"prefill / TTFT, {n} tokens", "request") for n in p.prompt_lengths] + [
            ("decode_b1", "decode, batch 1 (text head + argmax)", "token"),
            ("image_loop_b2", "image-token loop, CFG batch 2", "image token"),
            ("image_loop_b1", "image-token loop, batch 1", "image token"),
            ("vq_decoder", f"VQ decoder ({h}x{w})", "image"),
            ("unet_step_b2", "UNet step, CFG batch 2", "step"),
            ("vae_decoder", "VAE decoder", "image"),
            ("e2e_understand", f"end to end: understanding ({p.answer_tokens} answer tokens)", "request"),
            ("e2e_generate", f"end to end: {h}x{w} generation ({p.diffusion_steps} UNet steps)", "request"),
            ("e2e_edit", f"end to end: editing a {h}x{w} photo ({p.diffusion_steps} UNet steps)", "request")]


def _ms(r: dict | None) -> float | None:
    if r is None:
        return None
    return r.get("ms", r.get("ms_per_image_token"))


def _eager_for(key: str, eager: dict) -> dict | None:
    if key.startswith("image_loop_b"):
        return eager.get("image_step_b" + key[-1])
    return eager.get(key)


def markdown(result: dict) -> str:
    m, v = result["machine"], result["versions"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores ({result['protocol']['threads']} threads), read bandwidth "
             f"{m['read_bandwidth_gbs']:.1f} GB/s ({bandwidth_label(m)}). onnxruntime {v['onnxruntime']}, "
             f"torch {v['torch']}, "
             f"transformers {v['transformers']}, diffusers {v['diffusers']}; commit {result['git_commit'][:12]}.",
             f"Shape {result['shape']['name']}: {result['shape']['summary']}.", "",
             "| stage | per | ours fp32 ms | ours int4 ms | eager ms | fp32 vs eager | int4 vs eager |",
             "|---|---|---|---|---|---|---|"]
    ours, eager = result["ours"], result.get("eager", {})
    for key, label, per in stage_rows(Protocol.from_dict(result["protocol"])):
        a, b = _ms(ours.get("fp32", {}).get(key)), _ms(ours.get("int4", {}).get(key))
        e = _ms(_eager_for(key, eager)) if key in eager or key.startswith("image_loop") \
            else _ms(result.get("eager_composed", {}).get(key))
        if a is None and b is None and e is None:
            continue
        cell = lambda x: "-" if x is None else (f"{x:.1f}" if x < 100 else f"{x:.0f}")  # noqa: E731
        ratio = lambda x: "-" if x is None or e is None else f"{e / x:.2f}x"  # noqa: E731
        if b is None and a is not None and key in FP32_GRAPH_STAGES:  # the int4 engine runs the fp32 graph
            cell_b, ratio_b = "(fp32 graph)", "-"
        else:
            cell_b, ratio_b = cell(b), ratio(b)
        mark = " (composed)" if key in result.get("eager_composed", {}) else ""
        lines.append(f"| {label} | {per} | {cell(a)} | {cell_b} | {cell(e)}{mark} | {ratio(a)} | {ratio_b} |")
    lines.append("")
    quant = ours.get("int4", {}).get("component_precisions", {})
    if quant:
        groups: dict[str, list[str]] = {}
        for name, prec in quant.items():
            groups.setdefault(prec, []).append(name)
        lines.append("The int4 engine's graphs: " + "; ".join(f"{prec}: {', '.join(names)}"
                                                            for prec, names in sorted(groups.items())) + ".")
    for prec, o in ours.items():
        b2, b1 = o.get("image_loop_b2"), o.get("image_loop_b1")
        if b2 and b1:
            lines.append(f"Image loop {prec}: CFG batch 2 {b2['ms_per_image_token']:.1f} ms/image token = "
                         f"{b2['ms_per_image_token'] / b1['ms_per_image_token']:.2f}x batch 1; per token "
                         f"LLM {b2['llm_ms']:.1f}, head {b2['head_ms']:.1f}, sampler {b2['sampler_ms']:.2f}, "
                         f"other host {b2['host_ms']:.2f} ms (host work {b2['host_pct']:.1f}% of the loop; "
                         f"{b2['llm_calls']} LLM calls for {b2['positions']} positions). Peak RSS "
                         f"{o['peak_rss_mb']:.0f} MB.")
        rows = [(k, o[k]) for k in ("decode_b1", "image_loop_b1", "image_loop_b2") if "roofline_pct" in o.get(k, {})]
        if rows:
            lines.append(f"Roofline {prec} (weights streamed per token at {result['machine']['read_bandwidth_gbs']:.1f}"
                         " GB/s): " + "; ".join(f"{k} {r['mb_read']:.0f} MB, bound {r['bound_ms']:.1f} ms, "
                                                f"{r['roofline_pct']:.0f}%" for k, r in rows) + ".")
    if "peak_rss_mb" in eager:
        lines.append(f"Eager peak RSS {eager['peak_rss_mb']:.0f} MB (the torch modules of every component).")
    for k, why in result["failures"].items():
        lines.append(f"FAILED {k}: {why.strip().splitlines()[-1][:200] if why else ''}")
    for k, ok in result.get("parity", {}).items():
        lines.append(f"parity {k}: {ok}")
    return "\n".join(lines)


def roofline(o: dict, engine_dir: Path, cfg, p: Protocol, gbs: float) -> None:
    """Bytes of weights a decode step streams (initializers of the llm and head graphs, gathered tables
    excluded; llm_decode.streamed_weight_bytes) and, for batch-1 decode and the image loops, the bound at the
    measured bandwidth and the achieved share of it. Per image token: the LLM once per call, each sampled
    position its level's head."""
    from benchmarks.llm_decode import streamed_weight_bytes

    weights = {name: streamed_weight_bytes(engine_dir / f"{name}.onnx")["streamed"]
               for name in ["llm", "head_text"] + [f"head_level{i}" for i in range(cfg.num_levels)]}
    sampled = [a * b for a, b in (cfg.level_grid(i, *p.image_hw) for i in range(cfg.num_levels))]

    def add(r: dict, nbytes: float, ms: float) -> None:
        bound = nbytes / (gbs * 1e9) * 1e3
        r.update({"mb_read": nbytes / 1e6, "bound_ms": bound, "roofline_pct": 100 * bound / ms})

    if "decode_b1" in o:
        add(o["decode_b1"], weights["llm"] + weights["head_text"], o["decode_b1"]["ms"])
    for key in ("image_loop_b1", "image_loop_b2"):
        if key in o:
            r = o[key]
            heads = sum(n * weights[f"head_level{i}"] for i, n in enumerate(sampled))
            add(r, (r["llm_calls"] * weights["llm"] + heads) / r["positions"], r["ms_per_image_token"])


def parity(ours: dict, eager: dict) -> dict:
    """Same weights on both sides: the ViT features' first values and the greedy decode tokens must agree."""
    out = {}
    for prec, o in ours.items():
        a, b = o.get("parity_probe"), eager.get("parity_probe")
        if not a or not b:
            continue
        diff = float(np.max(np.abs(np.subtract(a["vision_features_head"], b["vision_features_head"]))))
        same = sum(x == y for x, y in zip(a["greedy_tokens"], b["greedy_tokens"]))
        tokens = f"greedy tokens {same}/{len(b['greedy_tokens'])} equal"
        if prec != "fp32":  # quantized weights: argmax over random logits is not expected to agree
            tokens += " (quantized LLM: not expected to agree)"
        out[prec] = f"vision features max |diff| {diff:.2e}; {tokens}"
    return out


def run(args) -> dict:
    t_start = time.perf_counter()
    given = {k: v for k, v in (("reps", args.reps), ("e2e_reps", args.e2e_reps),
                               ("diffusion_steps", args.diffusion_steps)) if v is not None}
    full = FULL_PROTOCOL if args.full else {}
    p = Protocol(**{**PROTOCOL_SIZES[args.shape], **full, **given, "threads": args.threads or cores()})
    log = lambda s: print(f"[stages {time.perf_counter() - t_start:6.1f}s] {s}", file=sys.stderr, flush=True)  # noqa
    cfg = SHAPES[args.shape]()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="illume-stages-"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"machine: {cpu_model()}, {cores()} cores; read bandwidth")
    bw = measure_read_bandwidth(p.threads, mib=256 if args.shape == "smoke" else 1024, reps=3)
    vit, movq = cfg.branches[0].encoder, cfg.branches[1].encoder.movq
    result: dict = {
        "date": dt.datetime.now().isoformat(timespec="seconds"), "host": socket.gethostname(),
        "machine": {"cpu": cpu_model(), "cores": cores(), "read_bandwidth_gbs": bw[BANDWIDTH_STATISTIC],
                    "bandwidth_statistic": BANDWIDTH_STATISTIC, "read_bandwidth": bw},
        "versions": versions(), "git_commit": git_commit(), "protocol": dataclasses.asdict(p),
        "shape": {"name": cfg.name, "config": cfg.to_dict(), "summary": (
            f"LLM {cfg.llm.num_layers} layers x {cfg.llm.hidden_size} ({cfg.llm.vocab_rows} vocab rows; code books "
            f"{'/'.join(str(lv.codebook_size) for lv in cfg.levels)}), ViT {vit.depth} blocks x {vit.embed_dim}, "
            f"MoVQ encoder ch {movq.ch} x {movq.num_res_blocks} res blocks, UNet "
            f"{cfg.diffusion.unet.block_out_channels}, VAE {cfg.diffusion.vae.block_out_channels}; generation "
            f"{p.image_hw[0]}x{p.image_hw[1]}, {p.diffusion_steps} UNet steps")},
        "ours": {}, "eager": {}, "failures": {},
    }
    common = {"shape": args.shape, "protocol": dataclasses.asdict(p), "work": str(work)}
    log(f"export: seeded random {cfg.name}, fp32 engine + int4 engine")
    result["export"] = _in_subprocess("export", common, timeout=3600)
    for prec in ("fp32", "int4"):
        log(f"ours {prec}")
        try:
            result["ours"][prec] = _in_subprocess("ours", {**common, "engine": str(work / f"engine-{prec}"),
                                                           "llm_stages_only": prec != "fp32"}, 3600)
        except Exception:  # a failing side is reported, not hidden
            result["failures"][f"ours {prec}"] = traceback.format_exc()
    if not args.skip_eager:
        log("PyTorch eager")
        try:
            result["eager"] = _in_subprocess("eager", {**common, "tokenizer": str(work / "tokenizer" /
                                                                                  "tokenizer.json")}, 3600)
            result["eager_composed"] = compose_eager_e2e(result["eager"], cfg, p)
        except Exception:
            result["failures"]["eager"] = traceback.format_exc()
    for prec, o in result["ours"].items():
        roofline(o, work / f"engine-{prec}", cfg, p, result["machine"]["read_bandwidth_gbs"])
    result["parity"] = parity(result["ours"], result["eager"])
    result["total_s"] = time.perf_counter() - t_start
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.stages", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="cpu", choices=sorted(SHAPES))
    ap.add_argument("--full", action="store_true", help="the long protocol: prompts up to 1024 tokens, all "
                    "repetitions, fp32 end to end too (~18 minutes on 2 cores)")
    ap.add_argument("--reps", type=int, default=None, help="short-stage repetitions (default: the shape's, 3)")
    ap.add_argument("--e2e-reps", dest="e2e_reps", type=int, default=None, help="end-to-end repetitions (1)")
    ap.add_argument("--diffusion-steps", dest="diffusion_steps", type=int, default=None, help="UNet steps (25)")
    ap.add_argument("--threads", type=int, default=None, help="default: the cores this process may use")
    ap.add_argument("--skip-eager", action="store_true")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work dir (engines)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<date>-<host>-stages.json)")
    args = ap.parse_args(argv)
    result = run(args)
    write_result(result, args.out, "-stages", markdown(result))
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
