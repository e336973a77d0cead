"""`make nano`: train ILLUME-nano from scratch with fixed seeds and write it in the ILLUME+ release formats.

Stages (docs/nano.md has the why of each):
  vit        semantic ViT pretrained on the world (per-token cell classes)
  tokenizer  SimVQ semantic tokenizer on the ViT features (6x6 codes per image)
  vae, unet  the diffusion detokenizer (code map -> latent -> pixels)
  stage0     the LLM's language pretraining, text only (standing in for the pretrained Qwen2.5 ILLUME starts
             from): questions of every kind about scenes written out as text. Off in "full" (it trades
             generation and editing for understanding: docs/nano.md), on in "text-pretrain"
  stage1     visual-embedding init: projector + embeddings + LM head, image reconstruction and captioning
  compare    (off in the shipped recipe) the yes / no of placed relation answers (axis-first, named-axis), places given
  lookup     single-turn questions of a few kinds at a time (color and shape in the shipped recipe)
  stage2     image-text alignment both ways: captioning, text-to-image (full captions), reconstruction
  stage3     SFT: question answering, GenEval-style generation, editing (+ replay of stage 2 tasks)
  judge      rendered near-miss assessments with a replay of stage 3 (off in "full", on in "judge-phase")
  stage4     self-enhancing alignment: the stage-3 model (exported, run by the runtime) generates images for
             training prompts, the evaluator assesses them into JSON; assessments (poor samples: assessment
             then a corrected image) join the SFT data for a last fine-tune. The same fine-tune without the
             assessment data is the ablation (its checkpoint is kept under the work folder, not shipped).

Run: python -m illume_edge.nano.recipe --out models/illume-nano [--work build/nano]
         [--schedule NAME (one of SCHEDULES; DEFAULT_SCHEDULE, "judge-edit-light", is make nano's)] [--seed N]
     Stage 4 alone, on the stage-3 weights of an earlier run (a schedule that differs in STAGE4_FIELDS only):
     python -m illume_edge.nano.recipe --stage3-from build/nano --schedule NAME --out OUT --work WORK
         [--stage4-set FIELD=VALUE ...]
     Experiments (`Experiment`, `RUN_FIELDS`): [--set FIELD=VALUE ...] [--decoders-from CHECKPOINT]
         [--snapshot PHASE ...] [--stop-after PHASE]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config import ModelConfig, preset
from ..export.checkpoint import save_checkpoint
from ..export.modules import IllumeModules, build_modules
from ..export.tokenizer_factory import build_tokenizer
from ..manifest import sha256_file
from ..runtime.prompts import TextTokenizer
from . import evaluator, text_pretrain, world
from .decoder_train import train_unet, train_vae
from .llm_train import LLMTrainer
from .progress import Progress
from .sequences import Example, SequenceBuilder
from .text import base_words
from .vision_train import SemanticTokenizer, VisionTower, code_purity, num_token_classes, pretrain_vit, train_tokenizer


@dataclass(frozen=True)
class Schedule:
    """Steps (and batch sizes) of every stage."""
    vit: int = 200
    # weight of the ViT's own-position targets (vision_train.pretrain_vit; 0: content targets only)
    vit_position: float = 0.0
    tokenizer: int = 500
    vae: int = 800
    unet: int = 1600
    stage0: int = 0
    stage0_layout: str = "scene-first"  # text_pretrain.LAYOUTS
    stage1: int = 200
    # after stage 1: single-turn image questions of `lookup_kinds` only (0: off). Trained alone, a fresh LLM
    # learns to look an object up in the image in a few hundred steps; in the full mixture it does not
    # (docs/nano.md, "Binding": "One kind at a time")
    lookup: int = 0
    lookup_kinds: tuple[str, ...] = ("color", "shape")
    # more lookup phases after that one, in order, each (kinds, steps) with its own one-cycle schedule. In a
    # probe, position questions alone after color, shape and then exist reached 0.90, and kept 0.83 when every
    # kind joined, against 0.45 without these phases (docs/nano.md, "One lookup phase per kind")
    lookup_then: tuple[tuple[tuple[str, ...], int], ...] = ()
    stage2: int = 800
    stage3_curriculum: int = 400
    # the share of grounding dialogues (Tasks.qa_grounding) in the stage-3 curriculum; the rest is stage 3's
    # mixture (docs/nano.md, "Why exist and relation sit at chance")
    curriculum_grounding: float = 0.5
    # the curriculum's share of stage 3's mixture keeps its edits (False: drops them). After the curriculum of
    # "judge-placed" without grounding dialogues, single-object prompts were drawn 0.23 of the time with its edits
    # and 0.68 without (docs/nano.md, "Edits in the curriculum of a placed run")
    curriculum_edits: bool = True
    stage3: int = 1000
    # after stage 3, before the self-assessment pool: a phase of rendered near-miss assessments
    # (JUDGE_RENDERED_SHARE of its examples) with a replay of stage 3 (0: off). In stage 3's mixture the rendered
    # assessments get about 100 steps' worth, and the judge's evidence stays right 0.38 of the time; in a probe,
    # 1200 steps of them alone made it 0.95; 800 steps of the phase made it 0.86 (docs/nano.md, "A judge trained
    # on rendered near misses")
    judge: int = 0
    # after stage 3's mixture, before the judge phase: GEN_PHASE_SHARE of GenEval-style text-to-image (GEN_WEIGHTS)
    # with a replay of stage 3 (0: off). With the lookup phases of "judge-lookups-mixed", the model drew one
    # object for 0.60 of held-out two-object position prompts (the shipped model, development set: 0.03); stage 3
    # gives those prompts about 250 steps' worth of its 1400 (docs/nano.md, "A generation phase, and generation
    # in stage 4")
    gen_phase: int = 0
    # after stage 1, before the lookup phase: text-only relation questions whose axis-first (or named-axis) reply
    # hands the model the two places and supervises only the yes / no (Tasks.compare; needs one of those styles).
    # In slots the places were right 0.98 after 1500 steps of relation questions, the yes / no after them only
    # 0.58-0.71; on images, inside the mixture of every kind, 0.38; in text alone 1.00 after 200 steps (a scratch
    # script), and after 400 of them at the start of "judge-axis", 1.00 inside its image answers (docs/nano.md,
    # "Relation, one axis at a time")
    compare: int = 0
    stage4: int = 300
    self_enhance_prompts: int = 320
    vision_batch: int = 64
    vae_batch: int = 16
    decoder_batch: int = 32
    llm_batch: int = 32
    # "short": answers as the world words them; "describe-first": every QA answer is the scene's description,
    # ". ", then the answer (world.describe_first); "axis-first": relation answers open with the two objects'
    # places along the asked axis ("top, bottom. yes", world.axis_first), the other kinds short; "named-axis":
    # the same with each place after its object's name ("the red circle top, the blue square bottom. yes",
    # world.named_axis). Any but "short" makes the checkpoint's prompts.answer_separator ". "
    answer_style: str = "short"
    # stage 4: the share of poor samples among the self-assessment examples (None: as the pool has them,
    # about a quarter; 0.5: good and poor drawn alike, so that "always yes" no longer fits the data)
    assess_poor_share: float | None = None
    # weight of rendered near-miss assessments (Tasks.assess_rendered) in stage 3's mixture, whose other
    # weights sum to 1; so also in stage 4's replay of it and in the ablation (0: off)
    assess_rendered: float = 0.0
    # every assessment the recipe trains (stage 4's and the rendered ones) opens with its evidence: what the
    # image shows of each shape the prompt names (evaluator.evidence; docs/nano.md, "Stating the evidence first")
    assess_evidence: bool = False
    # with assess_evidence: a position prompt's evidence gives where each object of its shapes lies along the
    # relation's axis instead of their colors ("circle: top; square: bottom"; evaluator.evidence(axis=True))
    evidence_axis: bool = False
    # stage 4: this share of its examples are edits added to its replay of stage 3 (whose own 0.25 editing
    # becomes 0.175 of stage 4 beside the 0.3 of assessments); the ablation keeps the same replay (0: off).
    # Stage 4 cost editing in every run with the judge phase (remove 0.25-0.60); 0.2 took it back to 0.76 in
    # a stage-4 run on the second seed's weights (docs/nano.md, "A judge trained on rendered near misses")
    stage4_edit: float = 0.0
    # stage 4: this share of its examples are GenEval-style text-to-image added to its replay of stage 3, in the
    # ablation too (0: off). The shipped run's ablation (stage 4 without the assessments) drew 0.927 of the
    # prompts right, its stage 4 0.831: the assessments take 30% of the steps that replay generation (docs/nano.md,
    # "A generation phase, and generation in stage 4")
    stage4_gen: float = 0.0


DEFAULT_SCHEDULE = "judge-edit-light"  # make nano's, and the shipped checkpoint's (models/illume-nano/recipe.json)
STAGE4_ASSESS_SHARE = 0.3  # of stage 4's examples: the model's own samples, assessed; the rest its replay

# Schedule.lookup_then of "judge-lookups-mixed" and after: color and shape with exist, position alone, then the four
CONSOLIDATED_LOOKUPS = ((("color", "shape", "exist"), 350), (("position",), 400),
                        (("color", "shape", "exist", "position"), 250))
SCHEDULES = {
    "full": Schedule(),
    # "full" plus 4000 steps of stage 0 (+7 minutes): understanding 0.786, generation 0.621, editing 0.312
    "text-pretrain": Schedule(stage0=4000),
    # stage 0 in the question-first layout ("<question> <description>. <answer>") and every image QA answered
    # after the model's own description of the scene: the text lookup that stage 0 teaches, on its own words.
    # Measured: understanding 0.676 (descriptions right 97%, answers from them at the plateau), generation
    # 0.671, editing 0.463, assessment agreement 0.254 (docs/nano.md)
    "reasoned": Schedule(stage0=4000, stage0_layout="question-first", answer_style="describe-first"),
    # "full" with good and poor self-assessment samples drawn 50/50 in stage 4. Measured as stage 4 alone on
    # the second seed's stage-3 weights: the scores now separate right and wrong samples over all prompts
    # (0.93 / 0.60) but not the candidates of one prompt, so best-of-4 gains nothing (docs/nano.md)
    "assess-balanced": Schedule(assess_poor_share=0.5),
    # "full" plus 750 steps of color and shape questions alone after stage 1 (+3 minutes): in a probe
    # (fresh LLM on the shipped vision tower) they reach 1.00 / 0.98 and stay there when every kind joins
    "lookup-first": Schedule(lookup=750),
    # "lookup-first" with a ViT that also learns where each token is (400 steps, the position targets
    # weighted 1): the shipped ViT's features say what a cell holds, not where (docs/nano.md, "Where an
    # object is")
    "lookup-where": Schedule(vit=400, vit_position=1.0, lookup=750),
    # "lookup-first" with rendered near-miss assessments in stage 3 (weight 0.1 against its other tasks' 1.0).
    # Measured: the judge scores wrong samples 0.50 and right ones 0.83, but agreement 0.710 and GenEval 0.731
    # (docs/nano.md, "A judge trained on rendered near misses")
    "lookup-judge": Schedule(lookup=750, assess_rendered=0.1),
    # "lookup-judge" with the evidence field in every assessment it trains. Measured with the field's first format
    # (colors per shape, "none" for an absent one): understanding 0.867, generation 0.806, editing 0.688,
    # agreement 0.752, the evidence right 0.39 teacher-forced (docs/nano.md)
    "lookup-evidence": Schedule(lookup=750, assess_rendered=0.1, assess_evidence=True),
    # "lookup-evidence" plus 800 steps of the judge phase after stage 3 (+7 minutes; 40.5 in all). Measured with
    # the evidence before it said whether each colored object asked for is there: evidence right 0.86, best-of-4
    # +4.8 points, agreement 0.781, but generation 0.769 and editing 0.662 (docs/nano.md)
    "judge-phase": Schedule(lookup=750, assess_rendered=0.1, assess_evidence=True, judge=800),
    # "judge-phase" with 0.2 more editing in stage 4 and its ablation. Measured, first seed: before training was
    # deterministic (the previous shipped checkpoint) understanding 0.857, generation 0.798, best-of-4 +6.0,
    # editing 0.850, agreement 0.904; deterministic (recipe.reproducible) 0.757 / 0.883 / +0.8 / 0.762 / 0.885
    # (docs/nano.md, "Reproducing a run")
    "judge-edit": Schedule(lookup=750, assess_rendered=0.1, assess_evidence=True, judge=800, stage4_edit=0.2),
    # "judge-edit" with 0.1 editing in stage 4: make nano's (DEFAULT_SCHEDULE). Measured, first seed,
    # deterministic (the shipped checkpoint): understanding 0.819, generation 0.831, best-of-4 +5.2, editing
    # 0.713, agreement 0.865 (docs/nano.md, "Reproducing a run")
    "judge-edit-light": Schedule(lookup=750, assess_rendered=0.1, assess_evidence=True, judge=800,
                                 stage4_edit=0.1),
    # "judge-edit-light" with one lookup phase per kind that the mixture holds back: color and shape (650 steps),
    # then exist (350), then position (400), each alone with its own schedule (+2 minutes). Measured: color and
    # shape lost (0.86 / 0.82), understanding 0.771, generation 0.710, agreement 0.796 (docs/nano.md)
    "judge-lookups": Schedule(lookup=650, lookup_then=((("exist",), 350), (("position",), 400)),
                              assess_rendered=0.1, assess_evidence=True, judge=800, stage4_edit=0.1),
    # "judge-lookups" with the lookups consolidated: color and shape (600), the three with exist (350), position
    # alone (400), then the four together (250). In a probe the four held 1.00 / 0.98 / 0.83 / 0.85 once every
    # kind joined. Measured (44.1 min): understanding 0.852 (exist 0.93, position 0.87), but generation 0.698,
    # best-of-4 +8.5, editing 0.738, agreement 0.873 (docs/nano.md, "One lookup phase per kind")
    "judge-lookups-mixed": Schedule(lookup=600, lookup_then=CONSOLIDATED_LOOKUPS,
                                    assess_rendered=0.1, assess_evidence=True, judge=800, stage4_edit=0.1),
    # "judge-lookups-mixed" with 250 steps of the generation phase after stage 3, paid for by 200 steps of the
    # judge phase (800 -> 600): the lookups made the model draw one object for two-object prompts. Measured (43.7
    # min): understanding 0.843, generation 0.738 (position prompts 0.31), editing 0.675 (recolor 0.00),
    # agreement 0.819, best-of-4 +1.2 (docs/nano.md, "A generation phase, and generation in stage 4")
    "judge-lookups-gen": Schedule(lookup=600, lookup_then=CONSOLIDATED_LOOKUPS,
                                  assess_rendered=0.1, assess_evidence=True, gen_phase=250, judge=600,
                                  stage4_edit=0.1),
    # "judge-lookups-gen" with 0.2 of stage 4 on GenEval-style text-to-image. Measured as stage 4 alone on that
    # run's stage-3 weights (with stage4_gen 0 the same script wrote the run's weights byte for byte):
    # understanding 0.857, generation 0.833, editing 0.675, agreement 0.854, best-of-4 +0.9 (docs/nano.md)
    "judge-lookups-gen-s4": Schedule(lookup=600, lookup_then=CONSOLIDATED_LOOKUPS,
                                     assess_rendered=0.1, assess_evidence=True, gen_phase=250, judge=600,
                                     stage4_edit=0.1, stage4_gen=0.2),
    # "judge-lookups-mixed" with 0.2 of stage 4 on GenEval-style text-to-image (measured as stage 4 alone on that
    # run's stage-3 weights): understanding 0.833, generation 0.796, editing 0.662, agreement 0.844, best-of-4 -1.3
    "judge-lookups-mixed-s4": Schedule(lookup=600, lookup_then=CONSOLIDATED_LOOKUPS, assess_rendered=0.1,
                                       assess_evidence=True, judge=800, stage4_edit=0.1, stage4_gen=0.2),
    # "judge-edit-light" with relation answered one axis at a time: relation answers open with the two objects'
    # places along the asked axis ("top, bottom. yes"), the comparison after them learned first in text
    # (400 steps), a lookup phase of position and relation questions (400), and the position prompts'
    # assessment evidence in the same words ("circle: top; square: bottom"). Measured (44.5 min): the yes / no
    # after the true places 1.00, both places 0.40, relation 0.433, but the relation phase took color and shape
    # (understanding 0.729) and two-object prompts (generation 0.733); agreement 0.792, best-of-4 +5.9, editing
    # 0.713 (docs/nano.md, "Relation, one axis at a time")
    "judge-axis": Schedule(lookup=750, lookup_then=((("position", "relation"), 400),), compare=400,
                           answer_style="axis-first", assess_rendered=0.1, assess_evidence=True, evidence_axis=True,
                           judge=800, stage4_edit=0.1),
    # "judge-axis" without its lookup phase of position and relation: that phase took color and shape from
    # the color-and-shape lookups before it and made two-object prompts draw one object, as the lookup phases of
    # "judge-lookups" did. Measured (43.0 min): color and shape and two-object prompts back (0.97 / 1.00 / 0.96),
    # the yes / no after the true places 1.00, both places 0.48, relation 0.400; understanding 0.776,
    # generation 0.792, best-of-4 -1.7, editing 0.787, agreement 0.781 (docs/nano.md, "Relation, one axis at a
    # time")
    "judge-edit-axis": Schedule(lookup=750, compare=400, answer_style="axis-first", assess_rendered=0.1,
                                assess_evidence=True, evidence_axis=True, judge=800, stage4_edit=0.1),
    # "judge-lookups-mixed" with a ViT whose features say where each token is (400 steps, own-position targets
    # weighted 1, as "lookup-where") and relation answered one axis at a time ("judge-axis"'s answer style,
    # 200 steps of the compare phase, the axis evidence); the judge phase 700 steps to stay within the budget.
    # In the image probe with the consolidated lookups the placed ViT put the places of axis-first relation
    # answers at 0.70 after every kind joined (0.55 with the shipped ViT), exist 1.00, position 0.92. Measured
    # (59.8 min on a VM running 1.2-1.7x slower than for the shipped run; ~43 min at that run's step times):
    # understanding 0.881 (exist 0.93; relation 0.63 by luck, 0.30-0.37 in the run's other checkpoints),
    # agreement 0.877, best-of-4 +12.7, but generation 0.606 (two objects 0.46, position 0.09), editing 0.675;
    # the compare phase did not form in 200 steps (docs/nano.md, "Where an object is, among others")
    "judge-placed": Schedule(vit=400, vit_position=1.0, lookup=600, lookup_then=CONSOLIDATED_LOOKUPS, compare=200,
                             answer_style="axis-first", assess_rendered=0.1, assess_evidence=True, evidence_axis=True,
                             judge=700, stage4_edit=0.1),
    # A seconds-long run of every stage for tests: same code path, meaningless weights.
    "smoke": Schedule(vit=2, vit_position=1.0, tokenizer=2, vae=2, unet=2, stage0=1, stage1=1, lookup=1,
                      lookup_then=((("exist",), 1),), stage2=1,
                      stage3_curriculum=1, stage3=1, gen_phase=1, judge=1, stage4=1, self_enhance_prompts=4,
                      vision_batch=4, vae_batch=2, decoder_batch=2, llm_batch=2, assess_rendered=0.1,
                      assess_evidence=True, stage4_edit=0.1, stage4_gen=0.1, compare=1, answer_style="axis-first",
                      evidence_axis=True),
}
# Schedule.answer_style -> (PromptTemplates.answer_separator, the QA answers' rewrite for Tasks)
ANSWER_STYLES = {"short": ("", None), "describe-first": (". ", world.describe_first),
                 "axis-first": (". ", world.axis_first), "named-axis": (". ", world.named_axis)}
# the answer styles whose relation answers give the places before the yes / no (what Schedule.compare trains)
PLACED_RELATION_STYLES = ("axis-first", "named-axis")
SEED = 20241209  # ILLUME's arXiv date
STAGE0_LR = 1e-3
VIT_LR = 2e-3  # the ViT stage's peak learning rate (also probes.placed_vit_tower's and from_scratch's)


def stage0_phases(s: Schedule) -> list[text_pretrain.Phase]:
    """Stage 0's (QA kinds, steps): every kind at once. (Color lookups alone first, 4000 of 5500 steps, formed
    the color lookup but lost it again once mixed: docs/nano.md, "Binding".)"""
    return [(world.QA_KINDS, s.stage0)]


# LLM stages 1-3, the generation phase and the judge phase in order: (Schedule field, what trains, peak
# learning rate, seed offset)
LLM_STAGES = (("stage1", "vision_init", 2e-3, 11), ("compare", "all", 1e-3, 19), ("lookup", "all", 1e-3, 16),
              ("stage2", "all", 2e-3, 12),
              ("stage3_curriculum", "all", 1e-3, 15), ("stage3", "all", 1e-3, 13), ("gen_phase", "all", 1e-3, 18),
              ("judge", "all", 1e-3, 17))
JUDGE_RENDERED_SHARE = 0.75  # Schedule.judge: the share of rendered assessments (the rest replays stage 3)
GEN_PHASE_SHARE = 0.6  # Schedule.gen_phase: the share of GenEval-style text-to-image (the rest replays stage 3)


# ----------------------------------------------------------------------------------------------------
# Task samplers: rng -> Example (train split only)
# ----------------------------------------------------------------------------------------------------
# GenEval categories in the SFT mix, weighted toward what needs composition (counts, attribute binding,
# relations) rather than what a single object already teaches.
GEN_WEIGHTS = {"single_object": 0.5, "two_object": 1.0, "counting": 2.0, "colors": 0.5, "position": 1.5,
               "color_attr": 2.0}
MAX_QA_TURNS = 6  # questions per image in a QA dialogue
SCAFFOLD_SHARE = 0.35  # share of QA turns that are one-attribute exist / relation / position (world.scaffold_qa)
RENDERED_TRIES = 8  # Tasks.assess_rendered: near misses drawn per prompt before another prompt
GROUNDING_TURNS = 4  # one-attribute questions before the conjunctive one in a grounding dialogue
GROUNDING_KIND_P = (0.6, 0.25, 0.15)  # their kinds, in world.SCAFFOLD_KINDS order (exist, relation, position)


def distinct_turns(ask: Callable[[], world.QA | None], want: int, tries: int) -> dict[str, str]:
    """question -> answer for up to `want` distinct questions from `ask` (None: this scene cannot pose the
    question drawn), giving up after `tries` draws."""
    turns: dict[str, str] = {}
    for _ in range(tries):
        q = ask()
        if q is not None:
            turns.setdefault(q.question, q.answer)
        if len(turns) == want:
            break
    return turns


class Tasks:
    def __init__(self, builder: SequenceBuilder, wcfg: world.WorldConfig,
                 answer_style: Callable[[world.Scene, world.QA], world.QA] | None = None,
                 assess_evidence: bool = False, evidence_axis: bool = False):
        """`answer_style` rewrites every QA answer of the dialogues (the probes' answer-format experiments,
        nano.probes.restyle; Schedule.answer_style); None keeps the world's answers. `assess_evidence`: the
        rendered assessments open with their evidence (Schedule.assess_evidence), `evidence_axis` in its axis
        form (Schedule.evidence_axis)."""
        self.b, self.w = builder, wcfg
        self.assess_evidence, self.evidence_axis = assess_evidence, evidence_axis
        self.style = answer_style
        weights = np.array([GEN_WEIGHTS[c] for c in world.GEN_CATEGORIES])
        self.gen_p = weights / weights.sum()

    @classmethod
    def for_schedule(cls, builder: SequenceBuilder, wcfg: world.WorldConfig, s: Schedule) -> Tasks:
        """The tasks as schedule `s` trains them: its answer style and its assessments' evidence field."""
        return cls(builder, wcfg, answer_style=ANSWER_STYLES[s.answer_style][1], assess_evidence=s.assess_evidence,
                   evidence_axis=s.evidence_axis)

    def _scene(self, rng):
        s = world.sample_scene(rng, self.w, split="train")
        return s, world.render(s, self.w)

    def reconstruct(self, rng) -> Example:
        _, im = self._scene(rng)
        return self.b.edit(im, None, im, task="reconstruct")

    def caption(self, rng) -> Example:
        s, im = self._scene(rng)
        return self.b.understand(im, world.make_qa(s, rng, "describe").question, world.describe(s), task="caption")

    def t2i_full(self, rng) -> Example:
        s, im = self._scene(rng)
        return self.b.generate(world.describe(s), im, task="t2i_full")

    def t2i_geneval(self, rng) -> Example:
        category = world.GEN_CATEGORIES[int(rng.choice(len(world.GEN_CATEGORIES), p=self.gen_p))]
        prompt, s = world.sample_gen_prompt(rng, self.w, category, "train")
        return self.b.generate(prompt.text, world.render(s, self.w), task="t2i_geneval")

    def t2i_uncond(self, rng) -> Example:
        _, im = self._scene(rng)
        return self.b.generate(None, im, task="t2i_uncond")

    def _styled(self, s: world.Scene, q: world.QA | None) -> world.QA | None:
        return self.style(s, q) if q is not None and self.style else q

    def question(self, s: world.Scene, rng) -> world.QA | None:
        if rng.random() < SCAFFOLD_SHARE:
            return self._styled(s, world.scaffold_qa(s, rng, str(rng.choice(world.SCAFFOLD_KINDS))))
        return self._styled(s, world.make_qa(s, rng, str(rng.choice(world.QA_KINDS))))

    def qa_single(self, rng, kinds: tuple[str, ...]) -> Example:
        """One question of one of `kinds` about one training scene (the lookup phase)."""
        s, q = world.sample_qa(rng, self.w, kinds)
        q = self._styled(s, q)
        return self.b.understand(world.render(s, self.w), q.question, q.answer, task="qa_lookup")

    def qa(self, rng) -> Example:
        """A dialogue of 1..MAX_QA_TURNS distinct questions about one training scene: kinds uniform, plus
        the one-attribute scaffolds of exist / relation / position (docs/nano.md: "Why exist and relation sit
        at chance")."""
        while True:
            s, im = self._scene(rng)
            want = int(rng.integers(1, MAX_QA_TURNS + 1))
            turns = distinct_turns(lambda: self.question(s, rng), want, tries=3 * want)
            if turns:
                return self.b.dialogue(im, list(turns.items()), task="qa")

    def qa_grounding(self, rng) -> Example:
        """Curriculum: a dialogue of one-attribute exist / relation / position questions, then one
        conjunctive exist or relation question about the same image (docs/nano.md: in probes the conjunctive
        yes/no questions left chance only after the one-attribute ones were learnt)."""
        while True:
            s, im = self._scene(rng)
            turns = distinct_turns(lambda: self._styled(s, world.scaffold_qa(
                s, rng, str(rng.choice(world.SCAFFOLD_KINDS, p=GROUNDING_KIND_P)))), GROUNDING_TURNS,
                tries=3 * GROUNDING_TURNS)
            q = self._styled(s, world.make_qa(s, rng, "exist" if rng.random() < 0.7 else "relation"))
            if q is not None:
                turns.setdefault(q.question, q.answer)
            if turns:
                return self.b.dialogue(im, list(turns.items()), task="qa_grounding")

    def compare(self, rng) -> Example:
        """A relation question without an image, its reply's places (in the answer style's words: axis-first or
        named-axis) given and its yes / no supervised (SequenceBuilder.answer_after): the comparison alone, in
        text, where it is cheap."""
        if self.style not in [ANSWER_STYLES[name][1] for name in PLACED_RELATION_STYLES]:
            raise ValueError(f"Tasks.compare: needs the axis-first or named-axis answer style, got {self.style!r}")
        while (q := world.make_qa(s := world.sample_scene(rng, self.w, split="train"), rng, "relation")) is None:
            pass
        places, answer = self.style(s, q).answer.rsplit(" ", 1)  # "top, bottom." "yes"
        return self.b.answer_after(q.question, places, answer, task="compare")

    def assess_rendered(self, rng) -> Example:
        """An assessment of a *rendered* image for a training prompt, judged by the evaluator. Half the images
        are right, half wrong (`rendered_assessment`). Unlike the model's own samples (stage 4's pool, about a
        quarter poor), these are many, balanced and exact, so "always yes" does not fit them (docs/nano.md,
        "A judge trained on rendered near misses")."""
        r = rendered_assessment(rng, self.w, want_good=bool(rng.random() < 0.5), split="train")
        correction = None if r.verdict.good else world.render(r.source, self.w)
        shows = evaluator.evidence(r.prompt, r.scene, self.evidence_axis) if self.assess_evidence else None
        return self.b.assess(world.render(r.scene, self.w), r.prompt.text,
                             evaluator.assessment_to_json(r.verdict, shows), correction, task="assess_rendered")

    def edit(self, rng) -> Example:
        e = world.sample_edit(rng, self.w, "train")
        return self.b.edit(world.render(e.source, self.w), e.instruction, world.render(e.target, self.w),
                           task=f"edit_{e.kind}")


@dataclass(frozen=True)
class RenderedAssessment:
    prompt: world.GenPrompt
    source: world.Scene  # the scene the prompt was made from (its rendering is the correction)
    scene: world.Scene  # the scene whose rendering is assessed: `source` or a near miss of it
    verdict: evaluator.Assessment  # the evaluator's on `scene`


def rendered_assessment(rng: np.random.Generator, wcfg: world.WorldConfig, want_good: bool,
                        split: str = "train") -> RenderedAssessment:
    """A prompt of `split` and a scene the evaluator judges right (`want_good`) or wrong for it. A right one is
    the prompt's own scene or a near miss the prompt does not notice (e.g. an extra object recolored); a wrong
    one a near miss that breaks it (world.near_miss). For "train", scenes of the held-out split are refused.
    Bounded: a clear error rather than an endless loop when no such scene can be drawn."""
    categories = world.GEN_CATEGORIES + ("full",)
    for _ in range(world.MAX_SAMPLING_TRIES):
        prompt, source = world.sample_gen_prompt(rng, wcfg, categories[int(rng.integers(len(categories)))], split)
        for _ in range(RENDERED_TRIES):
            keep = want_good and rng.random() < 0.5
            scene = source if keep else world.near_miss(source, rng, wcfg)
            if scene is None or not scene.objects or (split == "train" and world.is_heldout(scene, wcfg)):
                continue
            verdict = evaluator.assess(prompt, scene)
            if verdict.good == want_good:
                return RenderedAssessment(prompt, source, scene, verdict)
    raise RuntimeError(f"no {'right' if want_good else 'wrong'} rendered image for a prompt of the {split} split "
                       f"in {world.MAX_SAMPLING_TRIES} prompts x {RENDERED_TRIES} near misses")


def mixture(parts: list[tuple[float, Callable[[np.random.Generator], Example]]]):
    weights = np.array([w for w, _ in parts], dtype=np.float64)
    weights /= weights.sum()
    fns = [f for _, f in parts]

    def sample(rng: np.random.Generator) -> Example:
        return fns[int(rng.choice(len(fns), p=weights))](rng)
    return sample


def stage4_mixtures(sft: Callable, edit: Callable, assess: Callable, edit_share: float = 0.0,
                    gen: Callable | None = None, gen_share: float = 0.0):
    """Stage 4's mixture and its ablation's: STAGE4_ASSESS_SHARE of `assess`, the rest a replay of stage 3
    (`sft`) with `edit_share` of all examples moved to more edits (Schedule.stage4_edit) and `gen_share` to
    GenEval-style text-to-image (`gen`, Schedule.stage4_gen); the ablation is that replay alone."""
    replay_share = 1.0 - STAGE4_ASSESS_SHARE
    for field, share in (("stage4_edit", edit_share), ("stage4_gen", gen_share)):
        if not 0.0 <= share < replay_share:
            raise ValueError(f"{field} {share}: expected a share in [0, {replay_share}) of stage 4's examples")
    if edit_share + gen_share >= replay_share:
        raise ValueError(f"stage4_edit + stage4_gen = {edit_share + gen_share}: expected less than {replay_share}, "
                         f"the replay's share of stage 4, so that some of stage 3's mixture is replayed")
    moved = [(w, f) for w, f in ((edit_share, edit), (gen_share, gen)) if w]  # no zero weights: a schedule
    # without them draws exactly what it drew before the options
    replay = sft if not moved else mixture([(replay_share - edit_share - gen_share, sft)] + moved)
    return mixture([(STAGE4_ASSESS_SHARE, assess), (replay_share, replay)]), replay


def stage_mixtures(t: Tasks, lookup_kinds: tuple[str, ...] = Schedule.lookup_kinds,
                   assess_rendered: float = Schedule.assess_rendered,
                   curriculum_grounding: float = Schedule.curriculum_grounding,
                   curriculum_edits: bool = Schedule.curriculum_edits) -> dict[str, Callable]:
    stage2 = [(0.2, t.caption), (0.35, t.t2i_full), (0.2, t.reconstruct), (0.05, t.t2i_uncond), (0.2, t.qa)]
    stage3 = [(0.35, t.qa), (0.2, t.t2i_geneval), (0.05, t.t2i_full), (0.05, t.t2i_uncond), (0.25, t.edit),
              (0.05, t.reconstruct), (0.05, t.caption)]
    if assess_rendered:
        stage3.append((assess_rendered, t.assess_rendered))
    sft = mixture(stage3)
    return {"stage1": mixture([(0.5, t.reconstruct), (0.5, t.caption)]),
            "compare": t.compare, "lookup": lambda rng: t.qa_single(rng, lookup_kinds), "stage2": mixture(stage2),
            "stage3": sft,
            "judge": mixture([(JUDGE_RENDERED_SHARE, t.assess_rendered), (1 - JUDGE_RENDERED_SHARE, sft)]),
            "gen_phase": mixture([(GEN_PHASE_SHARE, t.t2i_geneval), (1 - GEN_PHASE_SHARE, sft)]),
            "stage3_curriculum": mixture([(curriculum_grounding, t.qa_grounding)]
                                         + [(w * (1 - curriculum_grounding), f) for w, f in stage3
                                            if curriculum_edits or f != t.edit])}


LOOKUP_THEN_SEED = 30  # seed offset of Schedule.lookup_then's first phase; the next ones count up from it


def lookup_then_phases(t: Tasks, phases: tuple[tuple[tuple[str, ...], int], ...]) -> list[tuple]:
    """Schedule.lookup_then as (stage name, sampler, steps, seed offset): "lookup_exist", "lookup_position", ..."""
    return [(f"lookup_{'+'.join(kinds)}", lambda rng, kinds=kinds: t.qa_single(rng, kinds), steps,
             LOOKUP_THEN_SEED + i) for i, (kinds, steps) in enumerate(phases)]


# ----------------------------------------------------------------------------------------------------
# Self-enhancing data
# ----------------------------------------------------------------------------------------------------
@dataclass
class AssessedSample:
    prompt: world.GenPrompt
    source: world.Scene  # the scene the prompt was made from (its rendering is the correction)
    image: np.ndarray  # what the model generated
    assessment: evaluator.Assessment
    shown: world.Scene | None = None  # the evaluator's parse of `image` (for the evidence field)


# The self-assessment pool samples at temperature 1, not at the checkpoint's (lower) default: the paper's data
# needs the model's poor samples as well as its good ones. These are the settings the shipped run's pool was
# drawn with (247 good of 320); the checkpoint's defaults (config.illume_nano) were chosen afterwards on a
# development set (nano.sampling_sweep), and pinning the pool keeps `make nano` reproducing the shipped run.
POOL_SAMPLING = {"temperature": 1.0, "top_k": 8, "cfg": 2.0, "decoder_cfg": 1.5}


def self_assess_pool(engine_dir: Path, wcfg: world.WorldConfig, n: int, seed: int,
                     progress: Progress) -> list[AssessedSample]:
    """Generate one image per training prompt with the runtime on the exported stage-3 engine (sampling at
    `POOL_SAMPLING`), assess it."""
    from ..runtime.pipeline import Pipeline

    pipe = Pipeline.load(engine_dir, threads=torch.get_num_threads(), check_hash=False)
    rng = np.random.default_rng(seed)
    out = []
    categories = world.GEN_CATEGORIES + ("full",)
    for i in range(n):
        prompt, scene = world.sample_gen_prompt(rng, wcfg, categories[i % len(categories)], "train")
        image = pipe.generate(prompt.text, seed=int(rng.integers(1 << 31)), **POOL_SAMPLING).image
        shown = evaluator.parse(image, wcfg)
        out.append(AssessedSample(prompt, scene, image, evaluator.assess(prompt, shown), shown))
        progress.update(i + 1, good=float(out[-1].assessment.good))
    return out


def assessment_examples(pool: list[AssessedSample], b: SequenceBuilder, wcfg: world.WorldConfig,
                        poor_share: float | None = None, evidence: bool = False, corrections: bool = True,
                        evidence_axis: bool = False):
    """Good samples: the assessment; poor ones: the assessment, then the corrected image (`corrections` False:
    the assessment alone). `poor_share`: draw a poor sample with this probability (None: uniformly from the
    pool). `evidence`: the assessment opens with what the image shows (evaluator.evidence of the sample's
    parsed scene; `evidence_axis`: its places along the relation's axis for position prompts)."""
    if evidence and any(s.shown is None for s in pool):
        raise ValueError("assessment_examples(evidence=True): every pool sample needs its parsed scene "
                         "(AssessedSample.shown); build the pool with self_assess_pool")
    good = [s for s in pool if s.assessment.good]
    poor = [s for s in pool if not s.assessment.good]
    if poor_share is not None and not (0.0 <= poor_share <= 1.0 and good and poor):
        raise ValueError(f"assess_poor_share {poor_share}: needs a share in [0, 1] and a pool with good and poor "
                         f"samples (pool: {len(good)} good, {len(poor)} poor)")

    def sample(rng: np.random.Generator) -> Example:
        if poor_share is None:
            s = pool[int(rng.integers(len(pool)))]
        else:
            group = poor if rng.random() < poor_share else good
            s = group[int(rng.integers(len(group)))]
        correction = None if s.assessment.good or not corrections else world.render(s.source, wcfg)
        shows = evaluator.evidence(s.prompt, s.shown, evidence_axis) if evidence else None
        return b.assess(s.image, s.prompt.text, evaluator.assessment_to_json(s.assessment, shows), correction,
                        task="assess")
    return sample


# ----------------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------------
# seed offsets of the stages outside LLM_STAGES (each stage's seed is SEED + its offset; no two stages share one)
SEED_OFFSETS = {"vit": 1, "tokenizer": 2, "vae": 3, "unet": 4, "stage0": 10, "stage4": 14, "self_assess": 20}


def _seed(offset: int | str, base: int = SEED) -> int:
    """`base` + `offset`, or + SEED_OFFSETS[`offset`] for a stage's name."""
    return base + (SEED_OFFSETS[offset] if isinstance(offset, str) else offset)


def load_modules(checkpoint: str | Path) -> tuple[IllumeModules, LLMTrainer, SequenceBuilder]:
    """(the checkpoint's modules, a trainer on their LLM, projector and vision tower (ViT + tokenizer from its
    DualViTok file), its sequence builder): training the trainer trains the modules, which export as they are."""
    from ..export.checkpoint import CheckpointPaths, load_checkpoint, read_dualvitok

    mods = load_checkpoint(checkpoint)
    cfg, paths = mods.cfg, CheckpointPaths.from_dir(checkpoint)
    sem = SemanticTokenizer.from_dualvitok(read_dualvitok(paths.dualvitok), mods.quantizers[0], cfg.branches[0].in_dim)
    tower = VisionTower(cfg, mods.encoders["semantic"], sem)
    builder = SequenceBuilder(TextTokenizer.from_file(paths.mllm / "tokenizer.json", cfg), cfg)
    return mods, LLMTrainer(cfg, mods.llm, mods.projectors["semantic"], tower), builder


def dualvitok_extra(tokenizer: SemanticTokenizer, vit: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tokenizer's own training parts, stored under the release's ignored prefixes."""
    out = {f"semantic_encoder.vit.{k}": v for k, v in vit.state_dict().items()}
    out.update({f"semantic_encoder.proj.{k}": v for k, v in tokenizer.proj.state_dict().items()})
    out["semantic_encoder.feature_scale"] = tokenizer.feature_scale
    out.update({f"semantic_decoder.{k}": v for k, v in tokenizer.decoder.state_dict().items()})
    out.update({f"semantic_decoder.classes.{k}": v for k, v in tokenizer.classes.state_dict().items()})
    return out


def save(mods: IllumeModules, root: Path, words: list[str], extra: dict, dtype: torch.dtype) -> None:
    mods = copy.deepcopy(mods)
    for m in mods.all_modules():
        m.to(dtype)
    if root.exists():
        shutil.rmtree(root)
    save_checkpoint(mods, root, shards=1, base_words=words, dualvitok_extra={k: v.to(dtype) for k, v in extra.items()})


def export_fp32(ckpt: Path, out: Path) -> None:
    from ..export.checkpoint import load_checkpoint
    from ..export.engine import export_engine

    mods = load_checkpoint(ckpt)
    export_engine(mods, out, ckpt / "mllm" / "tokenizer.json", progress=lambda s: None)


@contextmanager
def reproducible(threads: int):
    """Training whose bytes depend only on the seeds (on one kind of CPU): a fixed thread count, since
    reductions are split by it, and torch's deterministic kernels. Without the second, an indexed read's
    backward (`table[labels]` in the tokenizer stage: index_put_ with accumulation) adds in thread order, and
    two runs of one seed drifted apart from the tokenizer's first steps into different models (docs/nano.md,
    "Reproducing a run"). Both settings are restored on exit."""
    was_threads, was_deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(was_threads)


class StageClock:
    """Seconds per stage (`times`, in the order the stages start) and each stage's progress bar, logged to `log`."""

    def __init__(self, log: Path):
        self.log, self.times = log, {}

    def stage(self, name: str, total: int) -> Progress:
        self.times[name] = time.perf_counter()
        return Progress(name, total, self.log)

    def done(self, name: str) -> None:
        self.times[name] = round(time.perf_counter() - self.times[name], 1)


@dataclass(frozen=True)
class Experiment:
    """Options of a run that is an experiment rather than `make nano` (all off by default).

    decoders_from: a checkpoint whose VAE and UNet are copied instead of training them (15 of a run's ~60
        minutes on a slow VM). The decoders read codes as the world's token classes (`train_tokenizer` assigns
        code c to class c), so a decoder of any run of the recipe reads any other run's codes; the other stages
        draw from their own seeds only, so their weights do not change.
    snapshots: LLM phase names (`llm_phase_names`) after which the weights are saved in fp32 as
        WORK/after_<name>, a checkpoint to export and evaluate: where in the recipe does a score move? Each
        holds SNAPSHOT_RECORD (the phase, seed and schedule that wrote it).
    stop_after: the LLM phase after which the run ends (no stage 4, no checkpoint under OUT).
    resume_from: a snapshot folder; the run takes its weights (vision, decoders, LLM) and trains only the LLM
        phases after the snapshot's, each from its own seed as in a whole run. So the run is the whole run of
        its schedule when the schedule's fields that act up to the snapshot's phase are the snapshot's: the
        fields that differ are listed in the run's record (`resumed_from`), the ones a phase after the
        snapshot reads (e.g. `curriculum_grounding` after stage 2) are the experiment."""
    decoders_from: Path | None = None
    snapshots: tuple[str, ...] = ()
    stop_after: str | None = None
    resume_from: Path | None = None


SNAPSHOT_RECORD = "snapshot.json"  # in each WORK/after_PHASE: {"phase", "seed", "schedule", "resumed_from"}


def read_snapshot(snapshot: Path, s: Schedule) -> tuple[dict, list[str]]:
    """(the snapshot's record, the LLM phases of `s` up to and including its phase: the phases a run resumed
    from it skips). Fails on a folder without a record or a phase `s` does not run."""
    path = snapshot / SNAPSHOT_RECORD
    if not path.is_file():
        raise FileNotFoundError(f"--resume-from {snapshot}: {SNAPSHOT_RECORD} is missing; resume from a folder that "
                                f"--snapshot PHASE wrote (WORK/after_PHASE)")
    record = json.loads(path.read_text())
    names = llm_phase_names(s)
    if record["phase"] not in names:
        raise ValueError(f"--resume-from {snapshot}: its phase {record['phase']!r} is not one of this schedule's "
                         f"LLM phases {names}")
    return record, names[:names.index(record["phase"]) + 1]


def schedule_differences(before: dict, s: Schedule) -> dict[str, list]:
    """{field: [the snapshot's value, this run's]} for every Schedule field that differs (as JSON values)."""
    now = json.loads(json.dumps(dataclasses.asdict(s)))
    return {k: [before.get(k), v] for k, v in now.items() if before.get(k) != v}


def llm_phase_names(s: Schedule) -> list[str]:
    """The LLM phases `s` runs, in order (those with steps): "stage1", "lookup", "lookup_position", ..."""
    names = []
    for name, *_ in LLM_STAGES:
        if getattr(s, name):
            names.append(name)
        if name == "lookup":
            names += [f"lookup_{'+'.join(kinds)}" for kinds, steps in s.lookup_then if steps]
    return names


def run(out: Path, work: Path, schedule: Schedule, threads: int = 2, seed: int = SEED,
        experiment: Experiment = Experiment()) -> dict:
    """Every stage in order; `seed` (default SEED, the shipped model's) sets every stage's seed."""
    names = llm_phase_names(schedule)
    for asked in experiment.snapshots + ((experiment.stop_after,) if experiment.stop_after else ()):
        if asked not in names:
            raise ValueError(f"recipe: no LLM phase {asked!r} in this schedule; its phases are {names}")
    if experiment.resume_from is not None:
        if experiment.decoders_from is not None:
            raise ValueError("recipe: --resume-from takes the snapshot's decoders; leave out --decoders-from")
        snapshot = read_snapshot(experiment.resume_from, schedule)
        skipped = snapshot[1]
        for asked in experiment.snapshots + ((experiment.stop_after,) if experiment.stop_after else ()):
            if asked in skipped:
                raise ValueError(f"recipe: phase {asked!r} comes before the end of the snapshot "
                                 f"{experiment.resume_from}; a resumed run trains only {names[len(skipped):]}")
    else:
        snapshot = None
    with reproducible(threads):
        return _run(out, work, schedule, threads, seed, experiment, snapshot)


def copy_decoders(mods: IllumeModules, checkpoint: Path) -> None:
    """Load the VAE and UNet of `checkpoint` (a nano checkpoint of the same config) into `mods`."""
    from ..export.checkpoint import load_checkpoint

    src = load_checkpoint(checkpoint)
    for name in ("vae", "unet"):
        try:
            getattr(mods, name).load_state_dict({k: v.float() for k, v in getattr(src, name).state_dict().items()})
        except RuntimeError as e:
            raise ValueError(f"--decoders-from {checkpoint}: its {name} does not fit this config's ({e}); give a "
                             f"checkpoint of the illume-nano preset") from None
    if src.scheduler_config != mods.scheduler_config:
        raise ValueError(f"--decoders-from {checkpoint}: its scheduler config {src.scheduler_config} differs "
                         f"from this config's {mods.scheduler_config}")


def _run(out: Path, work: Path, schedule: Schedule, threads: int, seed: int,
         experiment: Experiment = Experiment(), snapshot: tuple[dict, list[str]] | None = None) -> dict:
    """The run itself; `snapshot` is `read_snapshot(experiment.resume_from, schedule)`, read by `run`."""
    for field, kinds in [("lookup_kinds", schedule.lookup_kinds)] + [
            (f"lookup_then[{i}]", phase[0]) for i, phase in enumerate(schedule.lookup_then)]:
        if not kinds or sorted(set(kinds) - set(world.QA_KINDS)):
            raise ValueError(f"Schedule.{field}: expected QA kinds among {world.QA_KINDS}, got {list(kinds)}")
    if schedule.answer_style not in ANSWER_STYLES:
        raise ValueError(f"Schedule.answer_style: expected one of {sorted(ANSWER_STYLES)}, "
                         f"got {schedule.answer_style!r}")
    if schedule.compare and schedule.answer_style not in PLACED_RELATION_STYLES:
        raise ValueError(f"Schedule.compare {schedule.compare}: trains the yes / no after the places of a relation "
                         f"answer, but answer_style is {schedule.answer_style!r}; set answer_style to one of "
                         f"{PLACED_RELATION_STYLES} or compare=0")
    torch.manual_seed(seed)
    t_start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "train_log.jsonl"
    log.write_text("")
    cfg: ModelConfig = preset("illume-nano")
    separator = ANSWER_STYLES[schedule.answer_style][0]
    cfg = dataclasses.replace(cfg, prompts=dataclasses.replace(cfg.prompts, answer_separator=separator))
    wcfg = world.WorldConfig()
    words = base_words(cfg)
    tok = TextTokenizer(build_tokenizer(cfg, words), cfg)
    builder = SequenceBuilder(tok, cfg)
    clock = StageClock(log)
    stage, done, times = clock.stage, clock.done, clock.times
    s = schedule
    skipped, resumed = [], {}
    if experiment.resume_from is not None:
        mods, vit, sem_tok, tower, resumed = _resume(experiment.resume_from, *snapshot, cfg, s)
        skipped = snapshot[1]
    else:
        mods, vit, sem_tok, tower = _vision_and_decoders(cfg, wcfg, s, seed, experiment, stage, done)
        phases = stage0_phases(s)
        text_pretrain.pretrain_text(mods.llm, tok, cfg.tokens.im_end, wcfg, phases, batch=s.llm_batch,
                                    lr=STAGE0_LR, seed=_seed("stage0", seed),
                                    progress=stage("stage0", sum(n for _, n in phases)), layout=s.stage0_layout)
        done("stage0")
    trainer = LLMTrainer(cfg, mods.llm, mods.projectors["semantic"], tower)
    tasks = Tasks.for_schedule(builder, wcfg, s)
    mixes = stage_mixtures(tasks, s.lookup_kinds, s.assess_rendered, s.curriculum_grounding, s.curriculum_edits)
    for name, trainable, lr, offset in LLM_STAGES:
        phases = [(name, mixes[name], getattr(s, name), offset)]
        if name == "lookup":
            phases += lookup_then_phases(tasks, s.lookup_then)
        for label, sample, steps, phase_offset in phases:
            if steps == 0 or label in skipped:  # a phase this schedule leaves out, or the snapshot's
                continue
            trainer.train(sample, steps=steps, batch=s.llm_batch, lr=lr, seed=_seed(phase_offset, seed),
                          trainable=trainable, progress=stage(label, steps))
            done(label)
            if label in experiment.snapshots:
                save(mods, work / f"after_{label}", words, dualvitok_extra(sem_tok, vit), torch.float32)
                snap = {"phase": label, "seed": seed, "schedule": dataclasses.asdict(s), "resumed_from": resumed}
                (work / f"after_{label}" / SNAPSHOT_RECORD).write_text(json.dumps(snap, indent=2) + "\n")
            if label == experiment.stop_after:
                summary = run_record(s, seed, threads, times, t_start,
                                     experiment=json.loads(json.dumps(dataclasses.asdict(experiment), default=str)),
                                     stopped_after=label, snapshots=[f"after_{n}" for n in experiment.snapshots],
                                     resumed_from=resumed)
                (work / EXPERIMENT_RECORD).write_text(json.dumps(summary, indent=2) + "\n")
                return summary

    # stage 4: the model's own samples, assessed; then the fine-tune with and without them
    extra = dualvitok_extra(sem_tok, vit)
    stage3_ckpt, stage3_engine = work / "stage3_checkpoint", work / "stage3_engine"
    p = stage("self_assess", s.self_enhance_prompts)
    save(mods, stage3_ckpt, words, extra, torch.float32)
    (work / STAGE3_RECORD).write_text(json.dumps({"seed": seed, "schedule": dataclasses.asdict(s)}, indent=2) + "\n")
    export_fp32(stage3_ckpt, stage3_engine)
    result = _stage4(mods, trainer, tasks, mixes["stage3"], builder, wcfg, s, seed, stage3_engine, p, stage, done)
    save(result.ablation, work / "ablation_checkpoint", words, extra, torch.float16)
    return _finish(mods, out, log, words, extra, s, seed, threads, times, t_start, result,
                   **({"resumed_from": resumed} if resumed else {}))


def config_differences(a, b, prefix: str = "") -> dict[str, list]:
    """{"dotted.field": [a's value, b's]} for every leaf field in which two configs (nested dataclasses) differ."""
    if dataclasses.is_dataclass(a) and type(a) is type(b):
        out = {}
        for f in dataclasses.fields(a):
            out.update(config_differences(getattr(a, f.name), getattr(b, f.name), f"{prefix}{f.name}."))
        return out
    return {} if a == b else {prefix.rstrip("."): [a, b]}


def _resume(snapshot: Path, record: dict, skipped: list[str], cfg: ModelConfig, s: Schedule):
    """(modules, ViT, semantic tokenizer, vision tower, the record of the resume) from a snapshot folder
    (Experiment.resume_from) and what `read_snapshot` read from it."""
    mods, trainer, _ = load_modules(snapshot)
    if mods.cfg != cfg:
        diff = config_differences(mods.cfg, cfg)
        raise ValueError(f"--resume-from {snapshot}: its model config differs from this run's in {diff} (the "
                         f"snapshot's value, this run's); resume with the schedule of the run that wrote it (its "
                         f"answer_style sets prompts.answer_separator)")
    for m in mods.all_modules():
        m.float()
    resumed = {"snapshot": str(snapshot), "phase": record["phase"], "seed": record["seed"],
               "schedule_differences": schedule_differences(record["schedule"], s)}
    return mods, trainer.tower.vit, trainer.tower.tokenizer, trainer.tower, resumed


def _vision_and_decoders(cfg: ModelConfig, wcfg: world.WorldConfig, s: Schedule, seed: int, experiment: Experiment,
                         stage: Callable, done: Callable):
    """(modules, ViT, semantic tokenizer, vision tower): the ViT, tokenizer, VAE and UNet stages (the decoders
    copied instead with Experiment.decoders_from)."""
    mods = build_modules(cfg)
    vit = mods.encoders["semantic"].train().requires_grad_(True)
    pretrain_vit(cfg, vit, wcfg, steps=s.vit, batch=s.vision_batch, lr=VIT_LR, seed=_seed("vit", seed),
                 progress=stage("vit", s.vit), position_weight=s.vit_position)
    done("vit")
    grid = cfg.level_grid(0, *cfg.anchors[0])
    quant = mods.quantizers[0].train().requires_grad_(True)
    sem_tok = SemanticTokenizer(quant, cfg.branches[0].in_dim, num_token_classes(grid, wcfg))
    p = stage("tokenizer", s.tokenizer)
    train_tokenizer(cfg, vit, sem_tok, wcfg, steps=s.tokenizer, batch=s.vision_batch, lr=3e-3,
                    seed=_seed("tokenizer", seed), progress=p)
    tower = VisionTower(cfg, vit, sem_tok)
    p.note(code_purity=round(code_purity(tower, wcfg), 4))
    done("tokenizer")

    if experiment.decoders_from is not None:
        copy_decoders(mods, experiment.decoders_from)
    else:
        train_vae(mods.vae.train().requires_grad_(True), wcfg, steps=s.vae, batch=s.vae_batch, lr=2e-3,
                  seed=_seed("vae", seed), progress=stage("vae", s.vae))
        done("vae")
        train_unet(cfg, mods.unet.train().requires_grad_(True), mods.vae, tower, wcfg, mods.scheduler_config,
                   steps=s.unet, batch=s.decoder_batch, lr=2e-3, seed=_seed("unet", seed),
                   progress=stage("unet", s.unet))
        done("unet")
    return mods, vit, sem_tok, tower


# Schedule fields that act in stage 4 and after; `run_stage4` may change them, not the others
STAGE4_FIELDS = {"self_enhance_prompts": int, "stage4": int, "assess_poor_share": float, "stage4_edit": float,
                 "stage4_gen": float}  # field -> the type --stage4-set reads its value as
EXPERIMENT_RECORD = "experiment_run.json"  # in the work folder of a run stopped by Experiment.stop_after
STAGE3_RECORD = "stage3_run.json"  # in the work folder, beside stage3_checkpoint: the seed and schedule it came from


@dataclass
class Stage4Result:
    good: int  # good samples in the self-assessment pool
    samples: int
    ablation: IllumeModules  # the stage-3 weights fine-tuned without the assessment data


def _stage4(mods: IllumeModules, trainer: LLMTrainer, tasks: Tasks, stage3_mix: Callable, builder: SequenceBuilder,
            wcfg: world.WorldConfig, s: Schedule, seed: int, stage3_engine: Path, pool_progress: Progress,
            stage: Callable[[str, int], Progress], done: Callable[[str], None]) -> Stage4Result:
    """Self-enhancing alignment on the stage-3 weights in `mods` (exported to `stage3_engine`): the pool of
    the model's own samples, assessed (its progress already started as "self_assess"), then stage 4 trains
    `trainer` (on `mods`) with the assessment data and the ablation trains a copy of the stage-3 weights on the
    same replay without it."""
    pool = self_assess_pool(stage3_engine, wcfg, s.self_enhance_prompts, _seed("self_assess", seed), pool_progress)
    good = sum(x.assessment.good for x in pool)
    pool_progress.note(samples=len(pool), good=good, poor=len(pool) - good)
    done("self_assess")
    stage3_state = copy.deepcopy(mods)
    assess_data = assessment_examples(pool, builder, wcfg, s.assess_poor_share, s.assess_evidence,
                                      evidence_axis=s.evidence_axis)
    with_assess, replay = stage4_mixtures(stage3_mix, tasks.edit, assess_data, s.stage4_edit, tasks.t2i_geneval,
                                          s.stage4_gen)
    trainer.train(with_assess, steps=s.stage4, batch=s.llm_batch, lr=5e-4, seed=_seed("stage4", seed), trainable="all",
                  progress=stage("stage4", s.stage4))
    done("stage4")

    ablation = LLMTrainer(trainer.cfg, stage3_state.llm, stage3_state.projectors["semantic"], trainer.tower)
    ablation.train(replay, steps=s.stage4, batch=s.llm_batch, lr=5e-4, seed=_seed("stage4", seed), trainable="all",
                   progress=stage("stage4_ablation", s.stage4))
    done("stage4_ablation")
    return Stage4Result(good, len(pool), stage3_state)


def run_record(s: Schedule, seed: int, threads: int, times: dict, t_start: float, **more) -> dict:
    """What a run's record (recipe.json, experiment_run.json) holds first: its schedule, seed, threads and times."""
    return {"schedule": dataclasses.asdict(s), "seed": seed, "threads": threads, "stage_seconds": times,
            "total_seconds": round(time.perf_counter() - t_start, 1), **more}


def _finish(mods: IllumeModules, out: Path, log: Path, words: list[str], extra: dict, s: Schedule, seed: int,
            threads: int, times: dict, t_start: float, result: Stage4Result, **more) -> dict:
    """Write the checkpoint, its training log, recipe.json (the summary, returned) and its checksums."""
    mods.generation_config = {"repetition_penalty": 1.0}
    save(mods, out, words, extra, torch.float16)
    shutil.copyfile(log, out / "train_log.jsonl")
    summary = run_record(s, seed, threads, times, t_start, torch=torch.__version__,
                         self_assess_pool={"samples": result.samples, "good": result.good}, **more)
    (out / "recipe.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_checksums(out)
    return summary


def _parse_bool(value: str) -> bool:
    if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(value)
    return value.lower() in ("true", "1")


# Schedule fields a whole run may change with --set (`schedule_overrides`): the scalar ones, each with the type
# its value is read as (the lookup phases, tuples, are changed by naming another schedule)
RUN_FIELDS = {f.name: (_parse_bool if isinstance(f.default, bool) else type(f.default))
              for f in dataclasses.fields(Schedule) if isinstance(f.default, (int, float, str))}
RUN_FIELDS["assess_poor_share"] = float


def schedule_overrides(schedule: Schedule, settings: list[str], fields: dict = STAGE4_FIELDS,
                       flag: str = "--stage4-set") -> Schedule:
    """`schedule` with "FIELD=VALUE" settings of `fields` (STAGE4_FIELDS for `--stage4-set`, RUN_FIELDS for
    `--set`; "none" for assess_poor_share's None), each VALUE of its field's type."""
    changes = {}
    for item in settings:
        field, sep, value = item.partition("=")
        if not sep or field not in fields:
            raise ValueError(f"{flag} {item!r}: expected FIELD=VALUE with FIELD one of {list(fields)}")
        kind = fields[field]
        try:
            changes[field] = None if field == "assess_poor_share" and value == "none" else kind(value)
        except ValueError:
            raise ValueError(f"{flag} {item!r}: {value!r} is not of type "
                             f"{'bool' if kind is _parse_bool else kind.__name__}") from None
    return dataclasses.replace(schedule, **changes)


def run_stage4(out: Path, work: Path, stage3_from: Path, schedule: Schedule, threads: int = 2,
               seed: int = SEED) -> dict:
    """Stage 4 and its ablation alone, on the stage-3 weights an earlier run left in `stage3_from` (its work
    folder: stage3_checkpoint, stage3_engine, stage3_run.json), with that run's seed and with `schedule`, which
    may differ from that run's only in STAGE4_FIELDS. With the run's own schedule it writes the run's weights
    again, byte for byte: the same code as `run`'s stage 4, on the same seeds."""
    with reproducible(threads):
        return _run_stage4(out, work, Path(stage3_from), schedule, threads, seed)


def _run_stage4(out: Path, work: Path, stage3_from: Path, schedule: Schedule, threads: int, seed: int) -> dict:
    ckpt, engine, recorded = (stage3_from / n for n in ("stage3_checkpoint", "stage3_engine", STAGE3_RECORD))
    for path in (ckpt, engine):
        if not path.is_dir():
            raise FileNotFoundError(f"run_stage4: {path} is missing; stage 4 needs the stage-3 weights and engine "
                                    f"of an earlier run: python -m illume_edge.nano.recipe --work {stage3_from} ...")
    if recorded.is_file():
        record = json.loads(recorded.read_text())
        if record["seed"] != seed:
            raise ValueError(f"run_stage4: {recorded} says the run's seed was {record['seed']}, got {seed}; "
                             f"pass --seed {record['seed']}")
        before = record["schedule"]
        mine = json.loads(json.dumps(dataclasses.asdict(schedule)))  # tuples as lists, as the file has them
        differ = sorted(k for k in set(before) | set(mine)
                        if k not in STAGE4_FIELDS and before.get(k) != mine.get(k))
        if differ:
            raise ValueError(f"run_stage4: the schedule differs from {recorded}'s before stage 4 in {differ} "
                             f"(expected only {list(STAGE4_FIELDS)} to change); give the schedule (and --set settings) "
                             f"that run used")
    else:
        print(f"run_stage4: {recorded} not found (runs before it was written, and `probes --extra-phase`, leave "
              f"none); the seed and the schedule's stages before stage 4 are not checked", file=sys.stderr)
    torch.manual_seed(seed)
    t_start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "train_log.jsonl"
    log.write_text("")
    mods, trainer, builder = load_modules(ckpt)
    extra = dualvitok_extra(trainer.tower.tokenizer, trainer.tower.vit)
    wcfg, s = world.WorldConfig(), schedule
    tasks = Tasks.for_schedule(builder, wcfg, s)
    clock = StageClock(log)
    stage, done, times = clock.stage, clock.done, clock.times

    mix = stage_mixtures(tasks, s.lookup_kinds, s.assess_rendered)["stage3"]
    p = stage("self_assess", s.self_enhance_prompts)
    result = _stage4(mods, trainer, tasks, mix, builder, wcfg, s, seed, engine, p, stage, done)
    words = base_words(mods.cfg)
    save(result.ablation, work / "ablation_checkpoint", words, extra, torch.float16)
    return _finish(mods, out, log, words, extra, s, seed, threads, times, t_start, result,
                   stage3_from=str(stage3_from))


CHECKSUMS = "SHA256SUMS"


def write_checksums(root: Path) -> None:
    """`sha256  relative/path` for every shipped file (checked by tests/test_nano_model.py)."""
    lines = [f"{sha256_file(p)}  {p.relative_to(root).as_posix()}" for p in sorted(root.rglob("*"))
             if p.is_file() and p.name != CHECKSUMS]
    (root / CHECKSUMS).write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="models/illume-nano", help="where the checkpoint is written")
    ap.add_argument("--work", default="build/nano", help="intermediate checkpoints, engines and the ablation")
    ap.add_argument("--schedule", default=DEFAULT_SCHEDULE, choices=sorted(SCHEDULES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=SEED, help="base of every stage's seed (another run of the recipe)")
    ap.add_argument("--stage3-from", dest="stage3_from", default=None, metavar="WORK",
                    help="run stage 4 and its ablation only, on the stage-3 weights an earlier run left in its work "
                         "folder WORK; the schedule may differ from that run's in " + ", ".join(STAGE4_FIELDS))
    ap.add_argument("--stage4-set", dest="stage4_set", action="append", default=[], metavar="FIELD=VALUE",
                    help="with --stage3-from: change a stage-4 field of the schedule (e.g. stage4_gen=0.1)")
    ap.add_argument("--set", dest="run_set", action="append", default=[], metavar="FIELD=VALUE",
                    help="experiments: change a field of the named schedule (e.g. vit_position=0); recipe.json "
                         "records the schedule the run used (with --stage3-from: the same settings as that run's)")
    ap.add_argument("--decoders-from", dest="decoders_from", default=None, metavar="CHECKPOINT",
                    help="experiments: copy the VAE and UNet of CHECKPOINT instead of training them")
    ap.add_argument("--snapshot", dest="snapshots", action="append", default=[], metavar="PHASE",
                    help="experiments: save the weights after this LLM phase as WORK/after_PHASE (repeatable)")
    ap.add_argument("--stop-after", dest="stop_after", default=None, metavar="PHASE",
                    help="experiments: end the run after this LLM phase (no stage 4, nothing under --out)")
    ap.add_argument("--resume-from", dest="resume_from", default=None, metavar="WORK/after_PHASE",
                    help="experiments: start from a snapshot's weights and train only the LLM phases after its "
                         "phase (with --set: what those phases do differently); the differing fields are recorded")
    args = ap.parse_args(argv)
    if args.stage4_set and args.stage3_from is None:
        ap.error("--stage4-set needs --stage3-from (a whole run takes a named schedule and --set)")
    experiment = Experiment(Path(args.decoders_from) if args.decoders_from else None, tuple(args.snapshots),
                            args.stop_after, Path(args.resume_from) if args.resume_from else None)
    if args.stage3_from is not None and experiment != Experiment():
        ap.error("--decoders-from, --snapshot, --stop-after and --resume-from act on a whole run, not on "
                 "--stage3-from")
    schedule = schedule_overrides(SCHEDULES[args.schedule], args.run_set, RUN_FIELDS, "--set")
    if args.stage3_from is not None:
        schedule = schedule_overrides(schedule, args.stage4_set)
        summary = run_stage4(Path(args.out), Path(args.work), Path(args.stage3_from), schedule, args.threads,
                             args.seed)
    else:
        summary = run(Path(args.out), Path(args.work), schedule, args.threads, args.seed, experiment)
    print(json.dumps(summary["stage_seconds"]), f"total {summary['total_seconds']} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
