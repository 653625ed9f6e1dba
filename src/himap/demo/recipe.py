"""The model organism's recipe (shape and training settings) and its training record, without torch, so that
the command line can build its flags from the fields without loading a model library."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError
from .synthetic import COLORS, FIXED_OPTIONS, NUMBERS, REGIONS, SHAPES, TASKS

ORGANISM_TASKS = ("color", "shape", "position")
ANSWER_WORDS = (*COLORS, *SHAPES, *REGIONS, *NUMBERS, "yes", "no")     # targets of the auxiliary word probe


@dataclass(frozen=True)
class OrganismConfig:
    """Model shape and training recipe. The image-token count is ``(image_size / patch_size) ** 2``."""

    layers: int = 8
    hidden: int = 96
    heads: int = 4
    vision_hidden: int = 64
    vision_layers: int = 3          # the projector reads the second-to-last layer, as LLaVA does
    image_size: int = 168
    patch_size: int = 14
    tasks: tuple[str, ...] = ORGANISM_TASKS
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 50
    max_steps: int = 3000
    eval_every: int = 150
    n_val: int = 300
    fixed_options: bool = True      # each task lists the same options in the same order (see synthetic.generate)
    target: float = 0.97
    word_weight: float = 1.0        # auxiliary answer-word probe (training only)
    lm_weight: float = 0.1          # auxiliary next-token loss on the prompt text
    max_minutes: float = 90.0
    seed: int = 0
    threads: int = 1

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise UserError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden % self.heads:
            raise UserError(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        if unknown := [t for t in self.tasks if t not in TASKS]:
            raise UserError(f"unknown tasks {unknown}; choose from {', '.join(TASKS)}")
        if self.fixed_options and (bad := [t for t in self.tasks if t not in FIXED_OPTIONS]):
            raise UserError(f"tasks {bad} have no fixed option list; choose from {', '.join(FIXED_OPTIONS)}")
        if self.vision_layers < 2:
            raise UserError("vision_layers must be >= 2 (the projector reads the second-to-last layer)")
        for name in ("batch_size", "max_steps", "eval_every", "n_val", "layers"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def n_img(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class TrainReport:
    steps: int = 0
    seconds: float = 0.0
    val_accuracy: float = 0.0
    history: list[dict] = field(default_factory=list)   # {"step", "loss", "val_accuracy", "seconds"}
