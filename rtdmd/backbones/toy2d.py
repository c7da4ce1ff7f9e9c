"""toy2d: the known-answer backbone (DESIGN.md §3).

"Images" are points in R^2; prompts name one of a few classes. Each class's data is a fixed,
seeded Gaussian mixture (modes on a circle, rotated per class). The teacher is a small MLP
velocity field ``v(x, sigma, class)`` trained by flow matching (``x_s = (1-s) x0 + s eps``,
target ``eps - x0``, spec §1.1) with label dropout so CFG works (class index ``C`` = the empty
prompt). Sigma schedules use the unshifted ``"linear"`` family (sigma = step / 1000).

Everything the real families expose is here too (protocol of ``base.py``), so the same trainers,
flow, tracking and registry run on it in seconds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from rtdmd.backbones.base import POINTS, BackboneError, Cond, two_pass_cfg

CLASS_NAMES = ("ring", "square", "triangle")
MODES_PER_CLASS = 4
MODE_RADIUS = 2.0
MODE_STD = 0.15
LORA_TARGETS = ["in_proj", "hidden.0", "hidden.1", "out_proj"]


def class_modes(class_index: int) -> torch.Tensor:
    """Mode centres ``[M, 2]`` of a class: M points on a circle, rotated by class."""
    base = torch.arange(MODES_PER_CLASS, dtype=torch.float64) * (2 * math.pi / MODES_PER_CLASS)
    angle = base + class_index * (math.pi / (MODES_PER_CLASS * len(CLASS_NAMES))) * 2.0
    return torch.stack([MODE_RADIUS * torch.cos(angle), MODE_RADIUS * torch.sin(angle)], dim=1).float()


def sample_data(class_index: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Exact samples of the data distribution p(x | c) for each class index in ``class_index``."""
    n = class_index.shape[0]
    modes = torch.stack([class_modes(c) for c in range(len(CLASS_NAMES))])  # [C, M, 2]
    which = torch.randint(0, MODES_PER_CLASS, (n,), generator=generator)
    centres = modes[class_index, which]
    return centres + MODE_STD * torch.randn(n, 2, generator=generator)


def class_index_of(prompt: str) -> int:
    """Map a prompt to its class index; the empty prompt is the unconditional index ``C``."""
    text = prompt.strip().lower()
    if text == "":
        return len(CLASS_NAMES)
    for i, name in enumerate(CLASS_NAMES):
        if text == name or text == f"a {name}" or text.endswith(f" {name}"):
            return i
    raise BackboneError(f"toy2d: prompt {prompt!r} names no class; expected one of {', '.join(CLASS_NAMES)}")


class VelocityMLP(nn.Module):
    """``v(x, sigma, c)``: sinusoidal sigma features + class embedding -> 3-layer SiLU MLP."""

    def __init__(self, hidden: int = 128, num_classes: int = len(CLASS_NAMES), time_features: int = 16):
        super().__init__()
        self.time_features = time_features
        self.class_embed = nn.Embedding(num_classes + 1, 32)
        self.in_proj = nn.Linear(2 + time_features + 32, hidden)
        self.hidden = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(2)])
        self.out_proj = nn.Linear(hidden, 2)
        self.act = nn.SiLU()

    def sigma_features(self, sigma: torch.Tensor) -> torch.Tensor:
        half = self.time_features // 2
        freqs = torch.exp(torch.linspace(0.0, math.log(100.0), half, device=sigma.device, dtype=sigma.dtype))
        ang = sigma[:, None] * freqs[None] * math.pi
        return torch.cat([torch.sin(ang), torch.cos(ang)], dim=1)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_index: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x, self.sigma_features(sigma.to(x.dtype)), self.class_embed(class_index)], dim=1)
        h = self.act(self.in_proj(h))
        for layer in self.hidden:
            h = self.act(layer(h)) + h
        return self.out_proj(h)


@dataclass
class TeacherTrainCfg:
    steps: int = 4000
    batch_size: int = 512
    lr: float = 2e-3
    label_dropout: float = 0.1
    hidden: int = 128
    seed: int = 0


def train_teacher(cfg: TeacherTrainCfg = TeacherTrainCfg()) -> VelocityMLP:
    """Flow-matching training of the toy2d teacher; deterministic for ``cfg.seed``."""
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    net = VelocityMLP(hidden=cfg.hidden)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    c_null = len(CLASS_NAMES)
    for _ in range(cfg.steps):
        cls = torch.randint(0, c_null, (cfg.batch_size,), generator=gen)
        x0 = sample_data(cls, gen)
        eps = torch.randn(cfg.batch_size, 2, generator=gen)
        sigma = torch.rand(cfg.batch_size, generator=gen)
        x = (1 - sigma[:, None]) * x0 + sigma[:, None] * eps
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.label_dropout
        cond = torch.where(drop, torch.full_like(cls, c_null), cls)
        loss = ((net(x, sigma, cond) - (eps - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    return net


def teacher_file(directory: str | Path) -> Path:
    return Path(directory) / "teacher.safetensors"


def save_teacher(net: VelocityMLP, directory: str | Path) -> Path:
    """Atomically write ``teacher.safetensors`` (+ manifest) into ``directory``."""
    from rtdmd.artifacts.fs import atomic_dir

    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(teacher_file(tmp)),
                  metadata={"hidden": str(net.in_proj.out_features)})
    return teacher_file(directory)


def load_teacher(directory: str | Path) -> VelocityMLP:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = teacher_file(directory)
    if not path.is_file():
        raise BackboneError(
            f"toy2d teacher weights not found at {path}; build them with "
            f"`python -m rtdmd.backbones.toy2d_teacher --out {Path(directory)}` (or `dvc repro toy2d_teacher`)"
        )
    try:
        with safe_open(str(path), "pt") as f:
            hidden = int((f.metadata() or {}).get("hidden", 128))
        state = load_file(str(path))
    except Exception as exc:  # truncated/corrupt file
        raise BackboneError(f"toy2d teacher file {path} is unreadable ({exc}); rebuild it") from None
    net = VelocityMLP(hidden=hidden)
    net.load_state_dict(state)
    return net.eval()


def ensure_teacher(directory: str | Path, cfg: TeacherTrainCfg = TeacherTrainCfg()) -> Path:
    """Train and cache the teacher when ``directory`` does not hold one yet.

    Training reseeds torch's global generator; it runs inside ``fork_rng`` so a first run that
    builds the cache draws the same LoRA init and training noise as every later run. Processes
    that start together (the ranks of one torchrun) build it once: the others wait on
    :func:`rtdmd.artifacts.lock.build_lock` and then load it."""
    path = teacher_file(directory)
    if path.is_file():
        return path
    from rtdmd.artifacts.lock import build_lock

    with build_lock(directory):  # ranks / processes that start together: one trains, the others wait
        if not path.is_file():
            with torch.random.fork_rng(devices=[]):
                save_teacher(train_teacher(cfg), directory)
    return path


class Toy2dBackbone:
    """Protocol implementation for toy2d (see module docstring)."""

    family = "toy2d"
    domain = POINTS
    lora_targets = list(LORA_TARGETS)

    def __init__(self, cfg, lora_targets: Sequence[str] | None = None, *, name: str = "toy2d",
                 device="cpu", dtype=torch.float32):
        self.cfg = cfg
        self.name = name
        self.device = torch.device(device)
        self.dtype = dtype
        if lora_targets:
            self.lora_targets = list(lora_targets)
        self.teacher_dir = Path(cfg.pretrained)
        if cfg.tiny:
            ensure_teacher(self.teacher_dir)
        self._teacher_state = load_teacher(self.teacher_dir).state_dict()

    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        idx = torch.tensor([class_index_of(p) for p in prompts], dtype=torch.long, device=self.device)
        return Cond({"class_index": idx})

    def empty_cond(self, batch: int) -> Cond:
        return Cond({"class_index": torch.full((batch,), len(CLASS_NAMES), dtype=torch.long, device=self.device)})

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, 2)

    def sigmas(self, step_list: Sequence[int]) -> list[float]:
        from rtdmd.algorithms.schedules import shifted_sigmas

        return shifted_sigmas(list(step_list), "linear")

    def velocity(self, net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        if sigma.shape != (x.shape[0],) and sigma.numel() in (1, x.shape[0]):
            sigma = sigma.reshape(-1).expand(x.shape[0])
        return net(x, sigma.to(x.dtype), cond.tensors["class_index"])

    def teacher_velocity(self, net, x, sigma, cond, uncond, scale):
        return two_pass_cfg(self.velocity, net, x, sigma, cond, uncond, scale)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def load_transformer(self, role: str) -> nn.Module:
        net = VelocityMLP(hidden=self._teacher_state["in_proj.weight"].shape[0])
        net.load_state_dict(self._teacher_state)
        net.requires_grad_(False)
        return net.to(device=self.device, dtype=self.dtype).eval()
