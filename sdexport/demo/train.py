"""Train the demo model on seeded shape drawings with accelerate: the VAE first, then the UNet with the text encoder.

    python -m sdexport.demo.train --out sdexport/demo/model            # this CPU: one thread, mixed precision "no"
    accelerate launch -m sdexport.demo.train --mixed-precision fp16   # several GPUs, unchanged

Not imported by the runtime. Deterministic given --seed (same machine, same thread count).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias

from sdexport.demo import architecture, shapes

log = logging.getLogger(__name__)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The training options."""
    p = argparse.ArgumentParser(prog="python -m sdexport.demo.train", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("sdexport/demo/model"), help="diffusers folder to write")
    p.add_argument("--logging-dir", type=Path, default=Path("build/demo-train-logs"), help="tensorboard logs")
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared machine)")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no", help='"no" on a CPU')
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--images", type=int, default=20000, help="training drawings (trained combinations only)")
    p.add_argument("--batch-size", type=int, default=32, help="per device and micro-batch")
    p.add_argument("--vae-steps", type=int, default=300, help="optimizer updates of the VAE stage")
    p.add_argument("--vae-batch-size", type=int, default=16, help="per device and micro-batch, VAE stage")
    p.add_argument("--vae-from", type=Path, help="skip stage 1: the folder holding vae/ from a previous run")
    p.add_argument("--vae-only", action="store_true", help="stop after stage 1 (the VAE is in OUT/vae)")
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-5)
    p.add_argument("--unet-steps", type=int, default=2200, help="optimizer updates of the diffusion stage")
    p.add_argument("--init-from", type=Path, help="start the UNet and text encoder from this saved folder")
    p.add_argument("--unet-lr", type=float, default=8e-4)
    p.add_argument("--text-lr", type=float, default=4e-4)
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of the updates warming up from 0.1 x lr")
    p.add_argument("--eta-min", type=float, default=1e-6, help="cosine schedule floor")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--empty-captions", type=float, default=0.1, help="fraction of empty captions (for CFG)")
    p.add_argument("--snr-gamma", type=float, default=5.0,
                   help="min-SNR loss weighting (Hang et al. 2023); 0 for the plain MSE")
    return p.parse_args(argv)


def lr_schedule(optimizer: torch.optim.Optimizer, updates: int, warmup: float, eta_min: float
                ) -> torch.optim.lr_scheduler.SequentialLR:
    """Linear warm-up from 0.1 x lr, then cosine annealing down to ``eta_min``."""
    warmup_steps = max(1, int(warmup * updates))
    warm = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=warmup_steps)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, updates - warmup_steps),
                                                        eta_min=eta_min)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, schedulers=[warm, cosine], milestones=[warmup_steps])


@dataclass
class Stage:
    """One training stage: its tag, prepared models, what they are trained on and how the loss is computed."""

    tag: str
    models: list[Any]
    param_groups: list[dict[str, Any]]
    data: torch.utils.data.Dataset
    loss: Callable[[list[Any], tuple[torch.Tensor, ...]], torch.Tensor]
    updates: int
    emas: list[Any]


def fit(accelerator: Any, stage: Stage, args: argparse.Namespace, batch_size: int) -> None:
    """The accelerate loop: accumulate, clip on sync, step optimizer / schedule / EMA, log, show progress."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(stage.param_groups)
    # A prepared schedule advances once per process on each update: size it in those units.
    schedule = lr_schedule(optimizer, stage.updates * accelerator.num_processes, args.warmup, args.eta_min)
    loader = torch.utils.data.DataLoader(stage.data, batch_size=batch_size, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(args.seed))
    *models, optimizer, schedule, loader = accelerator.prepare(*stage.models, optimizer, schedule, loader)
    params = [p for m in models for p in m.parameters()]
    for ema in stage.emas:
        ema.to(accelerator.device)
    bar = tqdm(total=stage.updates, desc=stage.tag, disable=not accelerator.is_local_main_process)
    done = 0
    while done < stage.updates:
        for batch in loader:
            with accelerator.accumulate(*models):
                loss = stage.loss(models, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            for ema, model in zip(stage.emas, models, strict=False):
                ema.step(model.parameters())
            done += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            accelerator.log({f"{stage.tag}/loss": loss.item(), f"{stage.tag}/lr": schedule.get_last_lr()[0]},
                            step=done)
            if done >= stage.updates:
                break
    bar.close()
    stage.models = [accelerator.unwrap_model(m) for m in models]


class Autoencode(torch.nn.Module):
    """The VAE's training forward (encode, sample, decode) as one module, so a distributed wrapper sees it."""

    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction and the KL term per picture.

        Decodes the posterior's mode: sampled latents trained several times slower on this data; the KL term
        still keeps the latents near unit scale.
        """
        posterior = self.vae.encode(pixels).latent_dist
        return self.vae.decode(posterior.mode()).sample, posterior.kl()


def _vae_loss(kl_weight: float) -> Callable[[list[Any], tuple[torch.Tensor, ...]], torch.Tensor]:
    def loss(models: list[Any], batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        (autoencode,), (pixels,) = models, batch
        recon, kl = autoencode(pixels)
        return F.mse_loss(recon.float(), pixels.float()) + kl_weight * kl.mean()

    return loss


def _pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(accelerator: Any, images: np.ndarray, args: argparse.Namespace) -> Any:
    """Stage 1: the autoencoder on the drawings (MSE reconstruction + a small KL term)."""
    autoencode = Autoencode(architecture.new_vae().train())
    data = torch.utils.data.TensorDataset(_pixels(images))
    groups = [{"params": autoencode.parameters(), "lr": args.vae_lr, "weight_decay": 0.0}]
    stage = Stage("vae", [autoencode], groups, data, _vae_loss(args.kl_weight), args.vae_steps, [])
    fit(accelerator, stage, args, args.vae_batch_size)
    return stage.models[0].vae.eval()


@torch.no_grad()
def encode_latents(vae: Any, images: np.ndarray, batch: int = 250) -> torch.Tensor:
    """The drawings' latent means, scaled to unit variance; the scale is stored in the VAE config."""
    means = torch.cat([vae.encode(_pixels(images[i:i + batch]).to(vae.device)).latent_dist.mean.cpu()
                       for i in range(0, len(images), batch)])
    scaling = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scaling)
    log.info("latents %s, scaling factor %.4f", tuple(means.shape), scaling)
    return means * scaling


def _snr_weights(alphas_cumprod: torch.Tensor, gamma: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """timesteps -> per-sample loss weights min(SNR, gamma) / SNR for noise prediction (all 1 when gamma is 0)."""
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    table = torch.ones_like(snr) if gamma <= 0 else torch.clamp(snr, max=gamma) / snr

    def weights(timesteps: torch.Tensor) -> torch.Tensor:
        return table.to(timesteps.device)[timesteps].float()

    return weights


def _diffusion_loss(args: argparse.Namespace, empty_ids: torch.Tensor
                    ) -> Callable[[list[Any], tuple[torch.Tensor, ...]], torch.Tensor]:
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler(**architecture.TRAIN_SCHEDULER)
    weights = _snr_weights(noise_scheduler.alphas_cumprod, args.snr_gamma)

    def loss(models: list[Any], batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        (unet, text_encoder), (latents, ids) = models, batch
        drop = torch.rand(ids.shape[0], device=ids.device) < args.empty_captions
        ids = torch.where(drop[:, None], empty_ids.to(ids.device), ids)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  device=latents.device, dtype=torch.int64)
        noise = torch.randn(latents.shape, device=latents.device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        hidden = text_encoder(ids)[0]
        error = F.mse_loss(unet(noisy, timesteps, hidden).sample.float(), noise.float(), reduction="none")
        return (error.mean(dim=(1, 2, 3)) * weights(timesteps)).mean()

    return loss


def _text_models(folder: Path | None) -> tuple[Any, Any]:
    """New UNet and text encoder, or (--init-from) those of a saved folder, in fp32, to train further."""
    if folder is None:
        return architecture.new_text_models()
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    return (UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet").float(),
            CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder").float())


def train_diffusion(accelerator: Any, latents: torch.Tensor, captions: list[str], tokenizer: Any,
                    args: argparse.Namespace) -> tuple[Any, Any]:
    """Stage 2: the UNet and the text encoder together (per-module learning rates), with an EMA of both."""
    from diffusers.training_utils import EMAModel

    def tokenize(texts: list[str]) -> torch.Tensor:
        return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids

    unet, text_encoder = (m.train() for m in _text_models(args.init_from))
    emas = [EMAModel(m.parameters(), decay=args.ema_decay, use_ema_warmup=True) for m in (unet, text_encoder)]
    groups = [
        {"params": unet.parameters(), "lr": args.unet_lr, "weight_decay": 1e-2},
        {"params": text_encoder.parameters(), "lr": args.text_lr, "weight_decay": 0.0},
    ]
    data = torch.utils.data.TensorDataset(latents, tokenize(captions))
    stage = Stage("diffusion", [unet, text_encoder], groups, data, _diffusion_loss(args, tokenize([""])[0]),
                  args.unet_steps, emas)
    fit(accelerator, stage, args, args.batch_size)
    for ema, model in zip(emas, stage.models, strict=True):
        ema.copy_to(model.parameters())
    return stage.models[0].eval(), stage.models[1].eval()


def _vae_stage(accelerator: Any, images: np.ndarray, args: argparse.Namespace) -> Any:
    """Stage 1, or the VAE a previous run saved (--vae-from); a trained one is saved to ``out/vae`` at once."""
    from diffusers import AutoencoderKL

    if args.vae_from is not None:
        return AutoencoderKL.from_pretrained(str(args.vae_from), subfolder="vae").float().eval()
    vae = train_vae(accelerator, images, args)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        vae.save_pretrained(str(args.out / "vae"), safe_serialization=True)
    return vae


def main(argv: Sequence[str] | None = None) -> int:
    """Generate the data, train both stages, save the pipeline folder from the main process."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    accelerator = Accelerator(mixed_precision=args.mixed_precision, log_with="tensorboard",
                              gradient_accumulation_steps=args.gradient_accumulation_steps,
                              project_dir=str(args.logging_dir))
    accelerator.init_trackers("sdexport-demo", config={k: str(v) for k, v in vars(args).items()})
    set_seed(args.seed)
    images, scenes = shapes.dataset(args.images, args.seed)
    vae = _vae_stage(accelerator, images, args)
    if args.vae_only:
        accelerator.end_training()
        return 0
    set_seed(args.seed + 1)  # the diffusion stage starts from the same state whether or not stage 1 just ran
    latents = encode_latents(vae, images)
    tokenizer = architecture.clip_tokenizer()
    unet, text_encoder = train_diffusion(accelerator, latents, [s.caption for s in scenes], tokenizer, args)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        architecture.save_pipeline(args.out, vae, unet, text_encoder, tokenizer)
        size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
        log.info("saved %s (%.2f MB)", args.out, size / 1e6)
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
